"""A loopback OTLP/HTTP sink for the tracing benchmark: takes ``POST /v1/traces`` and answers
an empty success, counting requests and bytes (``GET /stats``). Spans are not decoded: the
measured side is the exporting daemon, and the sink must cost the machine as little as it can.
"""

from __future__ import annotations

import sys

from aiohttp import web

from .baselines._serve import BaselineConfig, main as serve_main

STATS = web.AppKey("stats", dict)


async def traces(request: web.Request) -> web.Response:
    stats = request.app[STATS]
    stats["requests"] += 1
    stats["bytes"] += len(await request.read())
    return web.Response(body=b"", content_type="application/x-protobuf")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS])


def create_app(config: BaselineConfig) -> web.Application:
    app = web.Application(client_max_size=64 << 20)
    app[STATS] = {"requests": 0, "bytes": 0}
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", stats)
    return app


def main(argv: list[str] | None = None) -> int:
    return serve_main("llama_orch.io.bench.otlp_sink", __doc__, create_app, argv, engines=False)


if __name__ == "__main__":
    sys.exit(main())
