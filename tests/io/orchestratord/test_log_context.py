"""Log context: an engine call carries its own task's correlation id, whichever request's
handler happened to dispatch it (JSON log lines name the task they are about)."""

import asyncio
import uuid

from aiohttp import web

from llama_orch.core.events import PoolUpdated
from llama_orch.core.orchestrator import OrchestratorConfig
from llama_orch.core.types import PoolSnapshot
from llama_orch.io.daemon import CORRELATION
from llama_orch.io.orchestratord.app import create_app
from llama_orch.io.orchestratord.driver import DRIVER
from support import eventually

MODEL = "file:/models/tiny.gguf"


class HoldingEngine:
    """Records the correlation id in context when each call starts; holds each stream until released."""

    name = "mock"

    def __init__(self) -> None:
        self.seen: dict[str, str | None] = {}
        self.release = asyncio.Event()

    async def stream(self, request, sink) -> None:
        self.seen[request.task_id] = CORRELATION.get()
        await self.release.wait()
        sink.ended(tokens_out=0, decode_ms=1.0)


def body(task_id: str) -> dict:
    return {"task_id": task_id, "session_id": str(uuid.uuid4()), "workload": "completion", "model_ref": MODEL,
            "engine": "llamacpp", "ctx": 256, "priority": "interactive", "max_tokens": 4, "deadline_ms": 60_000,
            "prompt": "hello"}


async def test_a_task_dispatched_while_another_request_is_served_logs_with_its_own_correlation_id(aiohttp_client):
    app: web.Application = create_app(OrchestratorConfig(pool_stale_ms=3_600_000), [])
    client = await aiohttp_client(app)
    driver = app[DRIVER]
    engine = driver.adapters["mock"] = HoldingEngine()
    driver.handle(PoolUpdated(snapshot=PoolSnapshot(pool_id="pool-0", ready=True, slots_total=1, slots_free=1,
                                                    engine="llamacpp", model_ref=MODEL, ctx_max=4096,
                                                    engine_url="mock://pool-0")))
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    for task_id, cid in ((first, "cid-first"), (second, "cid-second")):
        resp = await client.post("/v2/tasks", json=body(task_id), headers={"X-Correlation-Id": cid})
        assert resp.status == 202, await resp.text()
    assert list(engine.seen) == [first]  # one slot: the second waits
    # the cancel of the first frees the slot inside the cancel request's handler: the second is
    # dispatched there, and must not inherit that request's correlation id
    resp = await client.post(f"/v2/tasks/{first}/cancel", headers={"X-Correlation-Id": "cid-of-the-cancel"})
    assert resp.status == 204
    await eventually(lambda: second in engine.seen, what="the second task dispatched")
    assert engine.seen == {first: "cid-first", second: "cid-second"}
    engine.release.set()


async def test_with_tracing_an_engine_call_runs_under_its_own_forward_to_engine_span(aiohttp_client):
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from llama_orch.io.tracing import setup

    spans = InMemorySpanExporter()
    app: web.Application = create_app(OrchestratorConfig(pool_stale_ms=3_600_000), [],
                                      tracing=setup("orchestratord", exporter=spans))
    client = await aiohttp_client(app)
    driver = app[DRIVER]
    current: dict[str, int] = {}

    class Engine(HoldingEngine):
        async def stream(self, request, sink) -> None:
            current[request.task_id] = trace.get_current_span().get_span_context().span_id
            await super().stream(request, sink)
    engine = driver.adapters["mock"] = Engine()
    driver.handle(PoolUpdated(snapshot=PoolSnapshot(pool_id="pool-0", ready=True, slots_total=1, slots_free=1,
                                                    engine="llamacpp", model_ref=MODEL, ctx_max=4096,
                                                    engine_url="mock://pool-0")))
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    for task_id in (first, second):
        assert (await client.post("/v2/tasks", json=body(task_id))).status == 202
    assert (await client.post(f"/v2/tasks/{first}/cancel")).status == 204  # the second is dispatched in here
    await eventually(lambda: second in current, what="the second task dispatched")
    engine.release.set()
    await eventually(lambda: len([s for s in spans.get_finished_spans() if s.name == "task"]) == 2,
                     what="both tasks' spans ended")
    tasks = {s.attributes["task_id"]: s for s in spans.get_finished_spans() if s.name == "task"}
    for task_id in (first, second):
        (mine,) = [s for s in spans.get_finished_spans() if s.name == "forward_to_engine"
                   and s.context.trace_id == tasks[task_id].context.trace_id]
        assert current[task_id] == mine.context.span_id, task_id
