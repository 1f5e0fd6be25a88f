"""The minimal relay: ``POST /v1/completions`` passed to the engines round-robin and streamed back.

Owns nothing but the pass-through: the request body goes upstream as read, with one pooled
keep-alive client session; the answer comes back with the engine's status and content type,
one write per upstream read. No validation, no per-request logging: it is the yardstick for
what relaying a stream costs in aiohttp at all.
"""

from __future__ import annotations

import sys

from aiohttp import web

from ._serve import BaselineConfig, main as serve_main, relay, with_engines


async def completions(request: web.Request) -> web.StreamResponse:
    return await relay(request, "/v1/completions", await request.read())


def create_app(config: BaselineConfig) -> web.Application:
    app = with_engines(web.Application(), config.engines)
    app.router.add_post("/v1/completions", completions)
    return app


def main(argv: list[str] | None = None) -> int:
    return serve_main("llama_orch.io.bench.baselines.relay", __doc__, create_app, argv)


if __name__ == "__main__":
    sys.exit(main())
