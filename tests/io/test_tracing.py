"""OpenTelemetry: the span tree of a task, traceparent on every hop, and OTLP export.

In process, each daemon gets its own provider and an in-memory exporter; then the daemons run
as real processes exporting OTLP/HTTP to a loopback receiver, whose spans are decoded with the
OTLP protobuf schema."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import aiohttp
import orjson
import pytest
from aiohttp import web
from cluster_support import CACHE, free_port
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from support import eventually

from llama_orch.core.orchestrator import OrchestratorConfig
from llama_orch.ext.sse import SSEParser
from llama_orch.io.config import PoolManagerSettings
from llama_orch.io.handoff import Handoff, write_handoff
from llama_orch.io.orchestratord.app import create_app as orchestratord_app
from llama_orch.io.pool_managerd.manager import create_app as pool_managerd_app
from llama_orch.io.provisioner.mock_engine import MockConfig
from llama_orch.io.provisioner.mock_engine import create_app as mock_engine_app
from llama_orch.io.tracing import enabled_by, setup

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
SECRET_PROMPT = "the-secret-prompt-7f3a"


def test_tracing_is_on_only_when_the_standard_environment_asks():
    assert not enabled_by({})
    assert enabled_by({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert enabled_by({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert enabled_by({"OTEL_TRACES_EXPORTER": "console"})
    assert not enabled_by({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"})
    assert not enabled_by({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"})
    assert setup("orchestratord", {}) is None


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def by_name(spans) -> dict[str, list]:
    found: dict[str, list] = {}
    for span in spans:
        found.setdefault(span.name, []).append(span)
    return found


async def test_a_task_is_one_trace_from_the_clients_traceparent_to_the_engine(tmp_path):
    orchd_spans, pmd_spans = InMemorySpanExporter(), InMemorySpanExporter()
    seen_by_engine: list[str] = []

    @web.middleware
    async def record(request, handler):
        if request.path == "/completion":
            seen_by_engine.append(request.headers.get("traceparent", ""))
        return await handler(request)
    engine = mock_engine_app(MockConfig(slots=2, tokens_per_s=2000))
    engine.middlewares.append(record)
    runners = []
    try:
        runner, engine_url = await serve(engine)
        runners.append(runner)
        write_handoff(tmp_path / "engines", Handoff(pool_id="pool-0", replica_id="r0", url=engine_url, slots_total=2,
                                                    model_id="file:/m/tiny.gguf"))
        settings = PoolManagerSettings(runtime_dir=tmp_path / "engines", provisioner_url=None, node_id="n1",
                                       watch_interval_ms=20, health_interval_ms=30)
        runner, pmd_url = await serve(pool_managerd_app(settings, tracing=setup("pool-managerd", exporter=pmd_spans)))
        runners.append(runner)
        runner, orchd_url = await serve(orchestratord_app(OrchestratorConfig(), [pmd_url], poll_interval_ms=50,
                                                          tracing=setup("orchestratord", exporter=orchd_spans)))
        runners.append(runner)
        async with aiohttp.ClientSession() as http:
            async def ready():
                async with http.get(f"{orchd_url}/readyz") as r:
                    return r.status == 200
            await eventually(ready, what="a ready pool")
            task_id = str(uuid.uuid4())
            body = {"task_id": task_id, "session_id": str(uuid.uuid4()), "workload": "completion",
                    "model_ref": "file:/m/tiny.gguf", "engine": "llamacpp", "ctx": 256, "priority": "interactive",
                    "max_tokens": 8, "deadline_ms": 30_000, "prompt": SECRET_PROMPT}
            headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
            async with http.post(f"{orchd_url}/v2/tasks", json=body, headers=headers) as r:
                assert r.status == 202, await r.text()
            parser, kinds = SSEParser(), []
            async with http.get(f"{orchd_url}/v2/tasks/{task_id}/events") as r:
                async for chunk in r.content.iter_any():
                    kinds += [k for k, _ in parser.feed(chunk)]
            assert kinds[-1] == "end"
        await eventually(lambda: "sse_stream" in by_name(orchd_spans.get_finished_spans()), what="the sse_stream span")
    finally:
        for runner in reversed(runners):
            await runner.cleanup()

    spans = by_name(orchd_spans.get_finished_spans())
    (task,) = spans["task"]
    assert task.kind is SpanKind.SERVER and f"{task.context.trace_id:032x}" == CLIENT_TRACE
    assert f"{task.parent.span_id:016x}" == CLIENT_SPAN and task.parent.is_remote
    assert task.attributes["task_id"] == task_id and task.attributes["outcome"] == "completed"
    for name in ("admission", "placement", "adapter_bind", "dispatch", "sse_stream"):
        (span,) = spans[name]
        assert span.parent.span_id == task.context.span_id, name
        assert span.context.trace_id == task.context.trace_id, name
    (forward,) = spans["forward_to_engine"]
    assert forward.kind is SpanKind.CLIENT and forward.parent.span_id == spans["dispatch"][0].context.span_id
    assert spans["placement"][0].attributes["pool_id"] == "pool-0" and spans["dispatch"][0].attributes["engine"]
    # the engine got the forward_to_engine span as its parent
    assert seen_by_engine == [f"00-{CLIENT_TRACE}-{forward.context.span_id:016x}-01"]
    # polls: orchestratord's pool_health_check is the parent of pool-managerd's get_status
    checks = {s.context.span_id: s for s in spans["pool_health_check"]}
    statuses = [s for s in pmd_spans.get_finished_spans() if s.name == "get_status"]
    assert statuses and all(s.kind is SpanKind.SERVER for s in statuses)
    joined = [s for s in statuses if s.parent is not None and s.parent.span_id in checks]
    assert joined and all(s.context.trace_id == checks[s.parent.span_id].context.trace_id for s in joined)
    (link,) = spans["placement"][0].links  # the placement names the health check it relied on
    assert link.context.span_id in checks
    # what went into attributes: ids and names, never the prompt
    everything = [*orchd_spans.get_finished_spans(), *pmd_spans.get_finished_spans()]
    assert not [s.name for s in everything if SECRET_PROMPT in orjson.dumps(dict(s.attributes or {})).decode()]


class OtlpReceiver:
    """A loopback OTLP/HTTP collector: ``POST /v1/traces`` with protobuf, decoded and kept."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []  # (service.name, span)

    async def traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource_spans in export.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "?")
            for scope in resource_spans.scope_spans:
                self.spans.extend((service, span) for span in scope.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        return app


@pytest.mark.timeout(120)
async def test_daemons_export_otlp_and_share_trace_ids_across_the_hop(tmp_path):
    receiver = OtlpReceiver()
    runner, collector = await serve(receiver.app())
    try:
        env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=collector, OTEL_BSP_SCHEDULE_DELAY="100")
        up = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llama_orch.cli", "up", "--engine", "mock", "--once", "--sample-tokens", "8",
            "--port", str(free_port()), "--pool-managerd-port", "0", "--provisioner-port", "0",
            "--state-dir", str(tmp_path / "state"), "--cache-dir", str(CACHE), env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(up.communicate(), 90)
        assert up.returncode == 0, (out + err).decode()
        services = {service for service, _ in receiver.spans}
        assert {"orchestratord", "pool-managerd"} <= services, services
        orchd = {s.span_id: s for service, s in receiver.spans if service == "orchestratord"}
        status = [s for service, s in receiver.spans if service == "pool-managerd" and s.name == "get_status"]
        shared = [s for s in status if s.parent_span_id in orchd and orchd[s.parent_span_id].trace_id == s.trace_id]
        assert shared, "no get_status span of pool-managerd is a child of an orchestratord poll"
        assert {"task", "admission", "placement", "dispatch", "forward_to_engine"} <= {s.name for s in orchd.values()}
    finally:
        await runner.cleanup()


def test_json_log_lines_carry_the_trace_and_span_of_the_current_span():
    import json
    import logging

    from opentelemetry import trace

    from llama_orch.io.daemon import JsonFormatter

    tracing = setup("pool-managerd", exporter=InMemorySpanExporter())
    record = logging.LogRecord("llama_orch.test", logging.INFO, __file__, 1, "inside %s", ("a span",), None)
    span = tracing.start("get_status")
    with trace.use_span(span, end_on_exit=True):
        line = json.loads(JsonFormatter("pool-managerd").format(record))
    context = span.get_span_context()
    assert line["msg"] == "inside a span" and line["daemon"] == "pool-managerd"
    assert (line["trace_id"], line["span_id"]) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")
    outside = json.loads(JsonFormatter("pool-managerd").format(record))
    assert "trace_id" not in outside  # no span current: no ids made up
