"""The client host's agent: every request of the lab leaves from the ``client`` namespace.

The harness in the root namespace must never send a packet to a lab address, so it asks this
process, started with ``ip netns exec lo-client``, over a Unix socket (a file, which is not
namespaced; its TCP peers are). It answers:

- ``POST /probe`` ``{method, url, json?, timeout_s?}``: one HTTP request from the client host,
  the answer as ``{status, body}`` or ``{error}``;
- ``POST /runs`` ``{url, api_key, rate, duration_s, max_tasks, max_tokens, deadline_s, ...}``:
  starts an open-loop load (tasks sent at ``rate`` per second for ``duration_s``, at most
  ``max_tasks``) through ``/v2/tasks`` and its SSE stream; ``GET /runs/{id}`` its progress;
  ``POST /runs/{id}/stop`` ends its sending; ``GET /runs/{id}/records`` every task's record and
  the in-flight timeline, for the accounting.

A task's record keeps what the client saw, timed on the monotonic clock (the same in every
namespace): when it was sent, the admission answer, each ``started`` event (pool and attempt),
the first token, every terminal event (two would be a duplicate), tokens after a terminal event,
and the outcome: ``end``, ``canceled``, ``error:<code>``, ``http:<status>``, ``unreachable`` (not admitted: no
connection), ``cut`` (admitted, then the connection to orchestratord broke) or ``lost`` (no
outcome within the client's own deadline). Every load is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import time
import uuid
from dataclasses import asdict, dataclass, field

import aiohttp
import orjson
from aiohttp import web

from ...ext.sse import SSEParser
from ..daemon import announce_until_signalled

MAX_TASKS = 5000
MAX_DURATION_S = 300.0
SAMPLE_INTERVAL_S = 0.1


@dataclass(slots=True)
class TaskRecord:
    n: int
    task_id: str
    correlation_id: str
    sent: float
    admitted: int | None = None  # HTTP status of the submission
    dispatches: list = field(default_factory=list)  # [t, pool_id, attempt]
    first_token: float | None = None
    tokens: int = 0
    tokens_after_terminal: int = 0
    terminals: int = 0
    outcome: str | None = None
    outcome_at: float | None = None
    detail: str = ""
    cancel_sent: float | None = None

    @property
    def pool_id(self) -> str | None:
        return self.dispatches[-1][1] if self.dispatches else None

    def finish(self, outcome: str, detail: str = "") -> None:
        if self.outcome is None:
            self.outcome, self.outcome_at, self.detail = outcome, time.monotonic(), detail[:300]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadPlan:
    url: str
    api_key: str = ""
    rate: float = 8.0
    duration_s: float = 10.0
    max_tasks: int = 1000
    max_tokens: int = 48
    deadline_s: float = 40.0  # the client's own: no outcome by then is a lost task
    task_deadline_ms: int = 30_000  # the task's deadline_ms at orchestratord
    cancel_ratio: float = 0.05  # canceled by the client after their first token
    prompt_words: int = 12
    seed: int = 0
    model_ref: str = ""
    engine: str = "llamacpp"

    @classmethod
    def parse(cls, body: dict) -> "LoadPlan":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(body) - known
        if unknown:
            raise ValueError(f"unknown load settings {sorted(unknown)}")
        plan = cls(**body)
        if not 0 < plan.rate <= 500 or not 0 < plan.duration_s <= MAX_DURATION_S:
            raise ValueError(f"rate must be in (0, 500] and duration_s in (0, {MAX_DURATION_S:g}]")
        if not 1 <= plan.max_tasks <= MAX_TASKS or not 0 < plan.deadline_s <= 600:
            raise ValueError(f"max_tasks must be 1-{MAX_TASKS} and deadline_s in (0, 600]")
        return plan


class Run:
    def __init__(self, plan: LoadPlan, http: aiohttp.ClientSession) -> None:
        self.plan = plan
        self.http = http
        self.records: list[TaskRecord] = []
        self.timeline: list[tuple[float, dict[str, int]]] = []
        self.stopping = asyncio.Event()
        self.started = time.monotonic()
        self.finished: float | None = None
        self.rng = random.Random(plan.seed)
        self.headers = {"Authorization": f"Bearer {plan.api_key}"} if plan.api_key else {}
        self.task = asyncio.ensure_future(self._run())

    def in_flight_by_pool(self, *, streaming: bool = False) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.records:
            if r.outcome is None and r.pool_id is not None and (not streaming or r.first_token is not None):
                counts[r.pool_id] = counts.get(r.pool_id, 0) + 1
        return counts

    def progress(self) -> dict:
        outcomes: dict[str, int] = {}
        for r in self.records:
            key = r.outcome or "pending"
            outcomes[key] = outcomes.get(key, 0) + 1
        return {"submitted": len(self.records), "outcomes": outcomes, "finished": self.finished is not None,
                "in_flight": self.in_flight_by_pool(), "streaming": self.in_flight_by_pool(streaming=True),
                "sending": not self.stopping.is_set() and self.finished is None}

    async def _run(self) -> None:
        sampler = asyncio.ensure_future(self._sample())
        tasks: set[asyncio.Task] = set()
        plan = self.plan
        try:
            end = self.started + plan.duration_s
            for n in itertools.count():
                due = self.started + n / plan.rate
                if n >= plan.max_tasks or due >= end or self.stopping.is_set():
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    try:  # the schedule itself; a stop request ends it early
                        await asyncio.wait_for(self.stopping.wait(), wait)
                        break
                    except asyncio.TimeoutError:
                        pass
                record = TaskRecord(n=n, task_id=str(uuid.uuid4()), correlation_id=f"lab-{uuid.uuid4().hex[:16]}",
                                    sent=time.monotonic())
                self.records.append(record)
                t = asyncio.ensure_future(self._task(record, self.rng.random() < plan.cancel_ratio))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks)
        finally:
            self.finished = time.monotonic()
            sampler.cancel()
            self._sample_once()

    def _sample_once(self) -> None:
        self.timeline.append((time.monotonic(), self.in_flight_by_pool()))

    async def _sample(self) -> None:
        while True:
            self._sample_once()
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    async def _task(self, r: TaskRecord, cancel: bool) -> None:
        try:
            await asyncio.wait_for(self._exchange(r, cancel), self.plan.deadline_s)
        except asyncio.TimeoutError:
            r.finish("lost", f"no outcome within the client's deadline of {self.plan.deadline_s:g} s")
            try:  # free whatever it holds, if orchestratord still knows it
                async with self.http.post(f"{self.plan.url}/v2/tasks/{r.task_id}/cancel", headers=self.headers,
                                          timeout=aiohttp.ClientTimeout(total=2)):
                    pass
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass

    def _body(self, r: TaskRecord) -> dict:
        plan = self.plan
        words = " ".join(self.rng.choice(("the", "cluster", "pool", "engine", "token", "stream", "host", "slot"))
                         for _ in range(plan.prompt_words))
        return {"task_id": r.task_id, "session_id": str(uuid.uuid4()), "workload": "completion",
                "model_ref": plan.model_ref, "engine": plan.engine, "priority": "interactive",
                "max_tokens": plan.max_tokens, "deadline_ms": plan.task_deadline_ms,
                "prompt": f"{r.n}: {words}", "ctx": 256 + plan.max_tokens}

    async def _exchange(self, r: TaskRecord, cancel: bool) -> None:
        plan = self.plan
        headers = {**self.headers, "X-Correlation-Id": r.correlation_id}
        try:
            async with self.http.post(f"{plan.url}/v2/tasks", json=self._body(r), headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=10, sock_connect=3)) as resp:
                r.admitted = resp.status
                raw = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            r.finish("unreachable", f"{type(exc).__name__}: {exc}")
            return
        if r.admitted != 202:
            r.finish(f"http:{r.admitted}", raw[:200].decode(errors="replace"))
            return
        try:
            stream = (orjson.loads(raw).get("streams") or {}).get("sse") or f"/v2/tasks/{r.task_id}/events"
        except (orjson.JSONDecodeError, AttributeError):
            stream = f"/v2/tasks/{r.task_id}/events"
        parser = SSEParser()
        try:
            async with self.http.get(plan.url + stream, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=None, sock_connect=3)) as resp:
                if resp.status != 200:
                    r.finish(f"http:{resp.status}", "the event stream was refused")
                    return
                async for chunk in resp.content.iter_any():
                    for kind, data in parser.feed(chunk):
                        self._event(r, kind, data)
                        if kind == "token" and cancel and r.cancel_sent is None and r.terminals == 0:
                            r.cancel_sent = time.monotonic()
                            asyncio.ensure_future(self._cancel(r))
        except (aiohttp.ClientError, OSError) as exc:
            if r.terminals == 0:
                r.finish("cut", f"{type(exc).__name__}: {exc}")
            return
        if r.terminals == 0:
            r.finish("cut", "the event stream closed without a terminal event")

    def _event(self, r: TaskRecord, kind: str, data: str) -> None:
        now = time.monotonic()
        if kind == "token":
            if r.terminals:
                r.tokens_after_terminal += 1
            r.tokens += 1
            if r.first_token is None:
                r.first_token = now
        elif kind == "started":
            event = orjson.loads(data)
            r.dispatches.append([now, event.get("pool_id"), event.get("attempt")])
        elif kind in ("end", "error"):
            r.terminals += 1
            event = orjson.loads(data)
            if kind == "end":
                r.finish("canceled" if event.get("canceled") else "end", str(event.get("reason") or ""))
            else:
                r.finish(f"error:{event.get('code')}", str(event.get("message", "")))

    async def _cancel(self, r: TaskRecord) -> None:
        try:
            async with self.http.post(f"{self.plan.url}/v2/tasks/{r.task_id}/cancel", headers=self.headers,
                                      timeout=aiohttp.ClientTimeout(total=5)):
                pass
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass


RUNS = web.AppKey("runs", dict)
HTTP = web.AppKey("http", aiohttp.ClientSession)


async def probe(request: web.Request) -> web.Response:
    spec = await request.json()
    http = request.app[HTTP]
    try:
        async with http.request(spec.get("method", "GET"), spec["url"], json=spec.get("json"),
                                headers=spec.get("headers") or {},
                                timeout=aiohttp.ClientTimeout(total=float(spec.get("timeout_s", 3)))) as resp:
            raw = await resp.read()
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = raw[:4000].decode(errors="replace")
            return web.json_response({"status": resp.status, "body": body}, dumps=lambda o: orjson.dumps(o).decode())
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return web.json_response({"error": f"{type(exc).__name__}: {exc}"})


async def start_run(request: web.Request) -> web.Response:
    try:
        plan = LoadPlan.parse(await request.json())
    except (ValueError, TypeError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    run_id = str(len(request.app[RUNS]) + 1)
    request.app[RUNS][run_id] = Run(plan, request.app[HTTP])
    return web.json_response({"run": run_id})


def _run_of(request: web.Request) -> Run:
    run = request.app[RUNS].get(request.match_info["run"])
    if run is None:
        raise web.HTTPNotFound(text="no such run")
    return run


async def run_progress(request: web.Request) -> web.Response:
    return web.json_response(_run_of(request).progress())


async def stop_run(request: web.Request) -> web.Response:
    run = _run_of(request)
    run.stopping.set()
    return web.json_response(run.progress())


async def run_records(request: web.Request) -> web.Response:
    run = _run_of(request)
    body = {"records": [asdict(r) for r in run.records], "timeline": run.timeline,
            "started": run.started, "finished": run.finished}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def _http_ctx(app: web.Application):
    # Many streams at once to one orchestratord: no per-host connection cap.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        app[HTTP] = http
        yield
        for run in app[RUNS].values():
            run.task.cancel()


def create_app() -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app[RUNS] = {}
    app.cleanup_ctx.append(_http_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/probe", probe)
    app.router.add_post("/runs", start_run)
    app.router.add_get("/runs/{run}", run_progress)
    app.router.add_post("/runs/{run}/stop", stop_run)
    app.router.add_get("/runs/{run}/records", run_records)
    return app


async def serve(socket_path: str) -> None:
    runner = web.AppRunner(create_app(), access_log=None)
    await runner.setup()
    await web.UnixSite(runner, socket_path).start()
    await announce_until_signalled(f"agent on {socket_path}")
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lab-agent", description="the lab's client host agent (see the module docstring)")
    p.add_argument("--socket", required=True, help="Unix socket path to serve the harness on")
    args = p.parse_args(argv)
    asyncio.run(serve(args.socket))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
