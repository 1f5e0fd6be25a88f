"""Bare aiohttp admission: ``POST /v2/tasks`` parsed with orjson and answered 202, nothing else.

Owns no state at all: the body is parsed, its ``task_id`` echoed with ``queue_position: 0``.
It is the floor for orchestratord's admission path: an aiohttp handler that reads and
answers a task as fast as aiohttp and orjson allow.
"""

from __future__ import annotations

import sys

import orjson
from aiohttp import web

from ._serve import BaselineConfig, main as serve_main


async def admit(request: web.Request) -> web.Response:
    try:
        task_id = orjson.loads(await request.read())["task_id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return web.Response(status=400, body=b'{"code":"INVALID_PARAMS","message":"task_id is required"}',
                            content_type="application/json")
    return web.Response(status=202, body=orjson.dumps({"task_id": task_id, "queue_position": 0}),
                        content_type="application/json")


def create_app(config: BaselineConfig) -> web.Application:
    app = web.Application()
    app.router.add_post("/v2/tasks", admit)
    return app


def main(argv: list[str] | None = None) -> int:
    return serve_main("llama_orch.io.bench.baselines.bare_admission", __doc__, create_app, argv, engines=False)


if __name__ == "__main__":
    sys.exit(main())
