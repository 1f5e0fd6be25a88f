"""What the baselines share: their command line, the pooled upstream session, the relay of one
upstream stream (one write per read), and serving an aiohttp app on uvloop with the
``READY <url>`` line and a clean exit on SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from ...daemon import announce_until_signalled
from ..process import run

SESSION = web.AppKey("session", aiohttp.ClientSession)
ENGINES = web.AppKey("engines", itertools.cycle)
#: The upstream request's one header: the engines read JSON whatever it says, so it is constant.
JSON_HEADERS = {"Content-Type": "application/json"}


async def relay(request: web.Request, path: str, body: bytes) -> web.StreamResponse:
    """POST ``body`` to the next engine's ``path`` and pass its answer on, one write per upstream read."""
    url = next(request.app[ENGINES]) + path
    async with request.app[SESSION].post(url, data=body, headers=JSON_HEADERS) as upstream:
        resp = web.StreamResponse(status=upstream.status,
                                  headers={"Content-Type": upstream.headers.get("Content-Type", "text/event-stream")})
        await resp.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client left: leaving the block drops the upstream connection, which stops the engine
    return resp


@dataclass(frozen=True, slots=True, kw_only=True)
class BaselineConfig:
    host: str = "127.0.0.1"
    port: int = 0
    engines: tuple[str, ...] = ()
    backlog: int = 1024


def parse_args(prog: str, description: str, argv: list[str] | None, *, engines: bool) -> BaselineConfig:
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (the READY line says which)")
    if engines:
        parser.add_argument("--engines", required=True, help="engine base URLs, comma-separated: used round-robin")
    parser.add_argument("--backlog", type=int, default=1024)
    args = parser.parse_args(argv)
    urls = tuple(url.strip().rstrip("/") for url in args.engines.split(",") if url.strip()) if engines else ()
    if engines and not urls:
        parser.error("--engines needs at least one URL")
    return BaselineConfig(host=args.host, port=args.port, engines=urls, backlog=args.backlog)


def with_engines(app: web.Application, engines: tuple[str, ...]) -> web.Application:
    """Give *app* the engines in turn (``next(app[ENGINES])``) and one pooled, unlimited client session."""
    app[ENGINES] = itertools.cycle(engines)

    async def session(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0)  # no cap: the yardstick must not queue on its own pool
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as s:
            app[SESSION] = s
            yield

    app.cleanup_ctx.append(session)
    return app


async def serve(app: web.Application, config: BaselineConfig) -> tuple[web.AppRunner, str]:
    """Start *app*; the runner (``await runner.cleanup()`` to stop) and the URL it listens on."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.port, backlog=config.backlog).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _run(app: web.Application, config: BaselineConfig) -> None:
    runner, url = await serve(app, config)
    try:
        await announce_until_signalled(url)
    finally:
        await runner.cleanup()


def main(prog: str, doc: str, make_app: Callable[[BaselineConfig], web.Application], argv: list[str] | None,
         *, engines: bool = True) -> int:
    config = parse_args(prog, doc.splitlines()[0], argv, engines=engines)
    run(_run(make_app(config), config))
    return 0
