"""The two-step relay: the v2 shape, ``POST /v2/tasks`` then ``GET /v2/tasks/{id}/events``.

Owns a dict of submitted bodies, bounded by count (429 past it): the POST stores the body
under its ``task_id`` and answers 202 with the stream's path; the GET takes the body out,
sends ``/completion`` to the next engine round-robin and relays the llama.cpp frames as
``text/event-stream``, one write per upstream read. No queue, no placement, no accounting:
it is the yardstick for what the two-request protocol costs in aiohttp at all.
"""

from __future__ import annotations

import sys

import orjson
from aiohttp import web

from ._serve import BaselineConfig, main as serve_main, relay, with_engines

MAX_TASKS = 100_000
TASKS = web.AppKey("tasks", dict)


def _json(status: int, data: object) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def submit(request: web.Request) -> web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _json(400, {"code": "INVALID_PARAMS", "message": "invalid JSON body"})
    task_id = body.get("task_id") if isinstance(body, dict) else None
    if not isinstance(task_id, str):
        return _json(400, {"code": "INVALID_PARAMS", "message": "task_id must be a string"})
    tasks = request.app[TASKS]
    if len(tasks) >= MAX_TASKS:
        return _json(429, {"code": "QUEUE_FULL", "message": f"{MAX_TASKS} tasks waiting for their stream"})
    tasks[task_id] = body
    return _json(202, {"task_id": task_id, "streams": {"sse": f"/v2/tasks/{task_id}/events"}})


async def events(request: web.Request) -> web.StreamResponse:
    body = request.app[TASKS].pop(request.match_info["task_id"], None)
    if body is None:
        return _json(404, {"code": "NOT_FOUND", "message": "unknown task"})
    upstream_body = orjson.dumps({"prompt": body.get("prompt", ""), "n_predict": body.get("max_tokens", 16),
                                  "stream": True})
    return await relay(request, "/completion", upstream_body)


def create_app(config: BaselineConfig) -> web.Application:
    app = with_engines(web.Application(), config.engines)
    app[TASKS] = {}
    app.router.add_post("/v2/tasks", submit)
    app.router.add_get("/v2/tasks/{task_id}/events", events)
    return app


def main(argv: list[str] | None = None) -> int:
    return serve_main("llama_orch.io.bench.baselines.relay_two_step", __doc__, create_app, argv)


if __name__ == "__main__":
    sys.exit(main())
