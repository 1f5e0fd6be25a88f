"""orchestratord in process, with a pool-managerd and mock engines on loopback."""

import asyncio
import gc
import logging
import tracemalloc
import uuid

import orjson
import pytest
from support import eventually, read_then_reset, task_body

from llama_orch.core.admission import QueuePolicy
from llama_orch.core.orchestrator import OrchestratorConfig
from llama_orch.core.sessions import BudgetPolicy
from llama_orch.ext.sse import SSEParser
from llama_orch.io.config import ConfigError, PoolManagerSettings, is_node_id
from llama_orch.io.handoff import Handoff, write_handoff
from llama_orch.io.orchestratord.app import create_app
from llama_orch.io.orchestratord.driver import DRIVER, NO_PAYLOAD, StreamLimits
from llama_orch.io.pool_managerd.manager import create_app as pool_managerd_app
from llama_orch.io.provisioner.mock_engine import ENGINE, MockConfig
from llama_orch.io.provisioner.mock_engine import create_app as mock_engine_app

MODEL = "file:/models/tiny.gguf"


async def cluster(aiohttp_server, aiohttp_client, tmp_path, *, slots=2, tokens_per_s=500.0, grace_s=30.0,
                  limits=StreamLimits(), engine_ctx=2048, **cfg):
    engine = await aiohttp_server(mock_engine_app(MockConfig(slots=slots, tokens_per_s=tokens_per_s, ctx=engine_ctx)))
    pmd = await aiohttp_server(pool_managerd_app(PoolManagerSettings(
        runtime_dir=tmp_path / "engines", watch_interval_ms=20, health_interval_ms=30, provisioner_url=None)))
    write_handoff(tmp_path / "engines", Handoff(pool_id="pool-0", replica_id="r0", url=str(engine.make_url("")).rstrip("/"),
                                                slots_total=slots, model_id=MODEL))
    client = await aiohttp_client(create_app(OrchestratorConfig(**cfg), [str(pmd.make_url("")).rstrip("/")],
                                             poll_interval_ms=30, shutdown_grace_s=grace_s, stream_limits=limits))

    async def ready():
        r = await client.get("/readyz")
        return r.status == 200
    await eventually(ready, what="a ready pool")
    client.engine = engine  # the in-process mock engine, for tests that look at it
    client.pmd = pmd  # and its pool-managerd
    return client


def task(**kw):
    return task_body(MODEL, **{"ctx": 2048, "max_tokens": 12, "deadline_ms": 120_000, **kw})


async def events_of(client, tid):
    resp = await client.get(f"/v2/tasks/{tid}/events")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    parser = SSEParser()
    out = []
    async for chunk in resp.content.iter_any():
        out += [(name, orjson.loads(data)) for name, data in parser.feed(chunk)]
    return out


async def test_a_task_streams_started_tokens_end(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path)
    body = task()
    resp = await client.post("/v2/tasks", json=body, headers={"X-Correlation-Id": "corr-1"})
    assert resp.status == 202 and resp.headers["X-Correlation-Id"] == "corr-1"
    adm = await resp.json()
    assert adm["task_id"] == body["task_id"] and adm["queue_position"] == 0 and adm["predicted_start_ms"] == 0
    assert adm["streams"]["sse"] == f"/v2/tasks/{body['task_id']}/events"
    events = await events_of(client, body["task_id"])
    kinds = [k for k, _ in events]
    assert kinds[0] == "started" and kinds[-1] == "end" and kinds.count("token") == 12
    assert [d["i"] for k, d in events if k == "token"] == list(range(12))
    assert events[-1][1]["tokens_out"] == 12 and events[0][1]["pool_id"] == "pool-0"


async def test_bad_requests_name_the_field(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path)
    resp = await client.post("/v2/tasks", json=task(max_tokens=0))
    body = await resp.json()
    assert resp.status == 400 and body["code"] == "INVALID_PARAMS" and body["field"] == "max_tokens"
    assert resp.headers["X-Correlation-Id"]  # generated when the client sent none
    resp = await client.post("/v2/tasks", json=task(model_ref="file:/models/none.gguf"))
    assert resp.status == 503 and (await resp.json())["code"] == "POOL_UNREADY"
    assert int(resp.headers["Retry-After"]) >= 1 and int(resp.headers["X-Backoff-Ms"]) >= 1
    for path in (f"/v2/tasks/{uuid.uuid4()}/events",):
        assert (await client.get(path)).status == 404
    assert (await client.post(f"/v2/tasks/{uuid.uuid4()}/cancel")).status == 404


async def test_cancel_while_streaming_ends_the_stream_with_no_token_after(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, tokens_per_s=50)
    body = task(max_tokens=500)
    await client.post("/v2/tasks", json=body)
    resp = await client.get(f"/v2/tasks/{body['task_id']}/events")
    parser, events = SSEParser(), []
    async for chunk in resp.content.iter_any():
        events += parser.feed(chunk)
        if sum(1 for k, _ in events if k == "token") >= 3 and not any(k == "end" for k, _ in events):
            cancel = await client.post(f"/v2/tasks/{body['task_id']}/cancel")
            assert cancel.status == 204 and "X-Correlation-Id" not in cancel.headers
            tokens_at_cancel = sum(1 for k, _ in events if k == "token")
            break
    async for chunk in resp.content.iter_any():
        events += parser.feed(chunk)
    kinds = [k for k, _ in events]
    end = orjson.loads(events[-1][1])
    assert kinds[-1] == "end" and end["canceled"] is True
    # Nothing was sent after the cancel was processed: the stream holds exactly the tokens the
    # core had forwarded then (tokens written just before may still be arriving after the 204).
    assert kinds.count("token") == end["tokens_out"] >= tokens_at_cancel


async def test_full_queue_is_a_429_with_retry_after(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, slots=1, tokens_per_s=20,
                           admission_capacity=1, admission_policy=QueuePolicy.REJECT)
    first, second, third = task(max_tokens=200), task(max_tokens=200), task(max_tokens=200)
    assert (await client.post("/v2/tasks", json=first)).status == 202
    assert (await client.post("/v2/tasks", json=second)).status == 202
    resp = await client.post("/v2/tasks", json=third)
    body = await resp.json()
    assert resp.status == 429 and body["code"] == "ADMISSION_REJECT" and body["policy_label"] == "reject"
    assert body["retriable"] is True and int(resp.headers["Retry-After"]) >= 1
    for t in (first, second):
        await client.post(f"/v2/tasks/{t['task_id']}/cancel")
    events = await events_of(client, second["task_id"])
    assert events[-1][0] == "end" and events[-1][1]["canceled"] is True


async def test_pools_listing(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path)
    pools = (await (await client.get("/v2/pools")).json())["pools"]
    assert [p["pool_id"] for p in pools] == ["pool-0"] and pools[0]["ready"] and pools[0]["model_ref"] == MODEL
    assert (await client.get("/livez")).status == 200


async def test_a_task_id_in_use_is_refused_without_touching_the_first(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path)
    body = task()
    assert (await client.post("/v2/tasks", json=body)).status == 202
    again = await client.post("/v2/tasks", json=body)
    assert again.status == 400 and "already in use" in (await again.json())["message"]
    events = await events_of(client, body["task_id"])
    assert events[0][0] == "started" and events[-1][0] == "end"


async def test_control_and_meta_endpoints(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, slots=2)
    health = await (await client.get("/v2/pools/pool-0/health")).json()
    assert health["ready"] is True and health["draining"] is False and health["metrics"]["slots_total"] == 2
    missing = await client.get("/v2/pools/nope/health")
    assert missing.status == 404 and (await missing.json())["code"] == "POOL_NOT_FOUND"
    caps = await (await client.get("/v2/meta/capabilities")).json()
    assert caps["api_version"] == "v2" and caps["engines"][0]["engine"] == "llamacpp"
    assert caps["engines"][0]["slots"] == 2 and caps["engines"][0]["models"] == [MODEL]
    assert (await (await client.get("/v2/meta/version")).json())["api_version"] == "v2"
    bad = await client.post("/v2/pools/pool-0/reload", json={})
    assert bad.status == 400 and "new_model_ref" in (await bad.json())["message"]  # pool-managerd's own answer
    drain = await client.post("/v2/pools/pool-0/drain", json={"deadline_ms": 1000})
    assert drain.status == 202 and (await drain.json())["pool_id"] == "pool-0"

    async def unavailable():  # idle, so drained at once: no longer ready, as discovery reports
        return not (await (await client.get("/v2/pools/pool-0/health")).json())["ready"]
    await eventually(unavailable, what="the drain seen through discovery")
    resp = await client.post("/v2/tasks", json=task())
    assert resp.status == 503 and (await resp.json())["code"] == "POOL_UNREADY"


async def test_metrics_follow_the_tasks(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path)
    body = task(max_tokens=5)
    await client.post("/v2/tasks", json=body)
    await events_of(client, body["task_id"])
    await client.post("/v2/tasks", json=task(model_ref="file:/none.gguf"))
    text = await (await client.get("/metrics")).text()
    # the pool's labels come from its snapshot (the handoff's replica r0, no engine version); a
    # queued task has no pool yet: "any"
    pool = 'engine="llamacpp",engine_version="unknown",pool_id="pool-0"'
    for line in ('tasks_enqueued_total{engine="llamacpp",engine_version="any",pool_id="any",priority="interactive",'
                 'replica_id="any"} 1.0',
                 f'tasks_started_total{{{pool},priority="interactive",replica_id="r0"}} 1.0',
                 f'tokens_out_total{{{pool},replica_id="r0"}} 5.0', f'tokens_in_total{{{pool},replica_id="r0"}} 1.0',
                 'tasks_rejected_total{engine="llamacpp",reason="POOL_UNREADY"} 1.0',
                 'orchd_pools_available{pool_id="pool-0"} 1.0', 'orchd_pool_breaker_open{pool_id="pool-0"} 0.0',
                 'queue_depth{engine="llamacpp",engine_version="any",pool_id="any",priority="interactive"} 0.0',
                 'queue_depth{engine="llamacpp",engine_version="any",pool_id="any",priority="batch"} 0.0',
                 f'latency_first_token_ms_count{{{pool},priority="interactive"}} 1.0',
                 f'latency_decode_ms_count{{{pool},priority="interactive"}} 1.0',
                 "placement_candidates_considered_count 1.0", 'placement_candidates_considered_bucket{le="1.0"} 1.0'):
        assert line in text, line
    assert body["task_id"] not in text  # never a task id as a label
    for line in ('orchd_tasks_dispatched_total{outcome="sent",pool_id="pool-0"} 1.0',
                 'orchd_tasks_dispatched_total{outcome="completed",pool_id="pool-0"} 1.0',
                 'orchd_admission_enqueued_total{outcome="admitted",pool_id="any"} 1.0',
                 'orchd_admission_rejected_total{pool_id="any",reason="POOL_UNREADY"} 1.0',
                 'orchd_admission_queue_depth{pool_id="any"} 0.0', 'orchd_dispatch_latency_ms_count{pool_id="pool-0"} 1.0',
                 'placement_decisions_total{fallback="false",outcome="placed",pinned="false"} 1.0'):
        assert line in text, line
    assert 'orchd_pool_health_checks_total{outcome="ok",pool_id="pool-0"}' in text
    assert 'orchd_pool_health_check_duration_ms_count{pool_id="pool-0"}' in text


async def test_verbose_stream_adds_narration_and_the_plain_one_does_not(aiohttp_server, aiohttp_client, tmp_path):
    import asyncio

    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, tokens_per_s=100)
    body = task(max_tokens=60)  # about 0.6 s: both readers attach while it runs

    async def verbose_events():
        resp = await client.get(f"/v2/tasks/{body['task_id']}/events?verbose=true")
        parser, events = SSEParser(), []
        async for chunk in resp.content.iter_any():
            events += [(k, orjson.loads(d)) for k, d in parser.feed(chunk)]
        return events

    assert (await client.post("/v2/tasks", json=body)).status == 202
    events, plain = await asyncio.gather(verbose_events(), events_of(client, body["task_id"]))
    kinds = [k for k, _ in events]
    notes = [d["text"] for k, d in events if k == "narration"]
    assert notes[0].startswith("Admitted at queue position 0") and "Placed on pool pool-0" in notes[1]
    assert notes[-1].startswith("Done: 60 tokens") and kinds[-1] == "end" and kinds[-2] == "narration"
    assert kinds.index("narration") < kinds.index("started") < kinds.index("token")
    assert [k for k, _ in plain] == [k for k in kinds if k != "narration"]  # the same stream without narration
    # A latecomer reads the same stream, every token included, while it is retained (it once got
    # started and end only).
    assert await events_of(client, body["task_id"]) == plain


async def test_one_reader_leaving_does_not_cancel_a_task_another_still_reads(aiohttp_server, aiohttp_client, tmp_path):
    import asyncio

    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, tokens_per_s=100)
    body = task(max_tokens=60)  # about 0.6 s
    assert (await client.post("/v2/tasks", json=body)).status == 202
    staying = asyncio.ensure_future(events_of(client, body["task_id"]))
    leaving = await client.get(f"/v2/tasks/{body['task_id']}/events")
    await leaving.content.readany()
    leaving.close()  # this reader hangs up early
    events = await asyncio.wait_for(staying, 10)
    assert events[-1][0] == "end" and "canceled" not in events[-1][1] and events[-1][1]["tokens_out"] == 60


async def test_made_up_pool_ids_never_become_metric_labels(aiohttp_server, aiohttp_client, tmp_path):
    # 5,000 pinned submissions to made-up pools once added 20,000 series for good.
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path)
    await client.post("/v2/tasks", json=task(placement={"mode": "pin", "pin_pool_id": "made-up-0"}))
    before = (await (await client.get("/metrics")).text()).count("\n")
    for i in range(1, 60):
        pinned = task(placement={"mode": "pin", "pin_pool_id": f"made-up-{i}", "allow_fallback": i % 2 == 0})
        resp = await client.post("/v2/tasks", json=pinned)
        assert resp.status in (202, 400, 404, 503), resp.status
    text = await (await client.get("/metrics")).text()
    assert "made-up" not in text
    assert text.count("\n") == before, "the scrape grew with client-chosen ids"
    assert 'pool_id="unknown"' in text
    # a pool that exists keeps its own label
    body = task(max_tokens=2, placement={"mode": "pin", "pin_pool_id": "pool-0"})
    assert (await client.post("/v2/tasks", json=body)).status == 202
    await events_of(client, body["task_id"])
    assert 'orchd_admission_enqueued_total{outcome="admitted",pool_id="pool-0"} 1.0' in \
        await (await client.get("/metrics")).text()


async def test_readers_dropped_with_resets_are_info_lines_not_errors(aiohttp_server, aiohttp_client, tmp_path,
                                                                    caplog):
    # 500 readers dropped with resets once wrote 28k log lines: an ERROR and a traceback each
    # (a write, or the final write_eof, into a transport the reset had closed).
    caplog.set_level(logging.INFO)
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, slots=8, tokens_per_s=200)
    driver = client.server.app[DRIVER]
    bodies = [task(max_tokens=200) for _ in range(24)]  # 8 streaming, 16 queued
    for body in bodies:
        assert (await client.post("/v2/tasks", json=body)).status == 202
    for _ in range(3):  # readers come and go: each reset is one reader leaving
        await asyncio.gather(*(read_then_reset(client.server.port, b["task_id"]) for b in bodies))
    await eventually(lambda: not driver.core.tasks, what="every task canceled once its last reader was gone")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def test_metrics_frames_and_time_and_cost_budgets(aiohttp_server, aiohttp_client, tmp_path):
    budgets = BudgetPolicy(tokens=100, time_ms=600_000, cost=10.0, cost_per_1k_prompt_tokens=1000.0,
                           cost_per_1k_output_tokens=100.0)
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, tokens_per_s=60, metrics_interval_ms=100,
                           budgets=budgets)
    sid = str(uuid.uuid4())
    body = task(session_id=sid, max_tokens=30, prompt="x" * 40)  # 10 prompt tokens: cost 10 + 30 * 0.1 = 13 > 10
    over = await client.post("/v2/tasks", json=body)
    assert over.status == 400 and "cost budget" in (await over.json())["message"]
    body = task(session_id=sid, max_tokens=30, prompt="x" * 20)  # 5 + 3 = 8 at most
    resp = await client.post("/v2/tasks", json=body)
    assert resp.status == 202
    # 8.0 of the 10 is reserved for this task's worst case
    assert resp.headers["X-Budget-Cost-Remaining"] == "2.0" and resp.headers["X-Budget-Time-Remaining-Ms"] == "600000"
    events = await events_of(client, body["task_id"])
    metrics = [d for k, d in events if k == "metrics"]
    assert metrics, [k for k, _ in events]  # 30 tokens at 60/s: about half a second, several frames
    streaming = [m for m in metrics if m["phase"] == "streaming"]
    assert streaming and all(0.0 <= m["on_time_probability"] <= 1.0 for m in metrics)
    assert streaming[-1]["tokens_out"] > 0 and streaming[-1]["tokens_per_s"] > 0
    assert set(metrics[0]["budget"]) == {"tokens_remaining", "time_remaining_ms", "cost_remaining"}
    view = await client.get(f"/v2/sessions/{sid}")
    got = await view.json()
    assert got["tokens_used"] == 30 and got["cost_used"] == 8.0 and got["time_used_ms"] > 0
    assert view.headers["X-Budget-Cost-Used"] == "8.0" and int(view.headers["X-Budget-Time-Used-Ms"]) > 0


async def test_shutdown_stops_admitting_and_waits_for_running_tasks(aiohttp_server, aiohttp_client, tmp_path):
    import asyncio

    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, tokens_per_s=200)
    body = task(max_tokens=1000)  # about 5 s: still running while the checks below are made
    assert (await client.post("/v2/tasks", json=body)).status == 202
    stream = asyncio.ensure_future(events_of(client, body["task_id"]))
    shutdown = asyncio.ensure_future(client.app.shutdown())  # what SIGTERM runs first
    try:
        async def refusing():
            return (await client.get("/readyz")).status == 503
        await eventually(refusing, timeout=5, what="readyz 503 during shutdown")
        late = await client.post("/v2/tasks", json=task())
        assert late.status == 503 and "shutting down" in (await late.json())["message"]
        assert int(late.headers["Retry-After"]) >= 1
        assert not shutdown.done()  # still waiting for the running task
        events = await asyncio.wait_for(stream, 20)
        assert events[-1][0] == "end" and events[-1][1]["tokens_out"] == 1000
        await asyncio.wait_for(shutdown, 10)
    finally:
        for pending in (stream, shutdown):
            pending.cancel()


async def test_sessions_report_their_token_budget(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, budgets=BudgetPolicy(tokens=30))
    sid = str(uuid.uuid4())
    first = task(session_id=sid, max_tokens=20)
    resp = await client.post("/v2/tasks", json=first)
    assert resp.status == 202 and resp.headers["X-Budget-Tokens-Remaining"] == "10"  # 20 reserved
    await events_of(client, first["task_id"])
    view = await client.get(f"/v2/sessions/{sid}")
    body = await view.json()
    assert (body["tasks"], body["tokens_used"], body["tokens_remaining"]) == (1, 20, 10) and body["pool_id"] == "pool-0"
    assert view.headers["X-Budget-Tokens-Used"] == "20"
    over = await client.post("/v2/tasks", json=task(session_id=sid, max_tokens=20))
    assert over.status == 400 and "budget" in (await over.json())["message"]
    assert (await client.delete(f"/v2/sessions/{sid}")).status == 204
    assert (await client.get(f"/v2/sessions/{sid}")).status == 404
    assert (await client.delete(f"/v2/sessions/{sid}")).status == 404


async def test_nodes_register_heartbeat_go_stale_and_deregister(aiohttp_server, aiohttp_client, tmp_path):
    engine = await aiohttp_server(mock_engine_app(MockConfig(slots=1)))
    pmd = await aiohttp_server(pool_managerd_app(PoolManagerSettings(
        runtime_dir=tmp_path / "engines", watch_interval_ms=20, health_interval_ms=30, provisioner_url=None)))
    write_handoff(tmp_path / "engines", Handoff(pool_id="pool-n", replica_id="r0", url=str(engine.make_url("")).rstrip("/"),
                                                slots_total=1, model_id=MODEL))
    pmd_url = str(pmd.make_url("")).rstrip("/")
    client = await aiohttp_client(create_app(OrchestratorConfig(), [], poll_interval_ms=30, node_stale_after_ms=1000))

    async def pool_ready():
        r = await client.get("/v2/pools/pool-n/health")
        return r.status == 200 and (await r.json())["ready"]

    bad = await client.post("/v2/nodes/register", json={"node_id": "n1", "base_url": "ftp://x"})
    assert bad.status == 400 and "base_url" in (await bad.json())["message"]
    assert (await client.post("/v2/nodes/n1/heartbeat")).status == 404  # unknown: it must register
    reg = await client.post("/v2/nodes/register", json={"node_id": "n1", "base_url": pmd_url})
    body = await reg.json()
    assert reg.status == 200 and body["stale_after_ms"] == 1000 and body["heartbeat_interval_ms"] > 0
    async def heartbeat_and_ready():  # a live node heartbeats: however slow this machine, it is not stale yet
        beat = await client.post("/v2/nodes/n1/heartbeat", json={"pools": ["pool-n"]})
        assert beat.status == 200
        return await pool_ready()
    await eventually(heartbeat_and_ready, what="the registered node's pool")  # polled from now on

    async def stale():
        nodes = (await (await client.get("/v2/nodes")).json())["nodes"]
        return nodes[0]["stale"] and not await pool_ready()
    await eventually(stale, timeout=5, what="the silent node going stale and its pool leaving placement")
    refused = await client.post("/v2/tasks", json=task())
    assert refused.status == 503  # nothing vouches for the pool now
    assert (await client.post("/v2/nodes/n1/heartbeat")).status == 200
    await eventually(pool_ready, what="the node back after a heartbeat")
    assert (await client.delete("/v2/nodes/n1")).status == 204
    assert (await (await client.get("/v2/pools")).json())["pools"] == []
    assert (await client.delete("/v2/nodes/n1")).status == 404


async def test_pool_managerd_registers_itself_heartbeats_and_deregisters(aiohttp_server, aiohttp_client, tmp_path):
    from cluster_support import free_port

    engine = await aiohttp_server(mock_engine_app(MockConfig(slots=1)))
    orchd = await aiohttp_server(create_app(OrchestratorConfig(), [], poll_interval_ms=30))
    client = await aiohttp_client(orchd)
    port = free_port()
    write_handoff(tmp_path / "engines", Handoff(pool_id="pool-r", replica_id="r0", url=str(engine.make_url("")).rstrip("/"),
                                                slots_total=1, model_id=MODEL))
    pmd = await aiohttp_server(pool_managerd_app(PoolManagerSettings(
        runtime_dir=tmp_path / "engines", watch_interval_ms=20, health_interval_ms=30, provisioner_url=None,
        node_id="worker-7", orchestratord_url=str(orchd.make_url("")).rstrip("/"),
        advertise_url=f"http://127.0.0.1:{port}")), port=port)

    async def registered_and_ready():
        nodes = (await (await client.get("/v2/nodes")).json())["nodes"]
        health = await client.get("/v2/pools/pool-r/health")
        return (nodes and nodes[0]["node_id"] == "worker-7" and nodes[0]["base_url"] == f"http://127.0.0.1:{port}"
                and health.status == 200 and (await health.json())["ready"])
    await eventually(registered_and_ready, what="pool-managerd registered and its pool ready, with no static config")
    await pmd.close()  # a clean shutdown deregisters: its pools leave at once, not 30 s later
    assert (await (await client.get("/v2/nodes")).json())["nodes"] == []
    assert (await (await client.get("/v2/pools")).json())["pools"] == []


async def test_unserved_workloads_bad_callbacks_and_correlation_on_pool_managerd(aiohttp_server, aiohttp_client,
                                                                                  tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path)
    resp = await client.post("/v2/tasks", json=task(workload="embedding"))
    body = await resp.json()
    assert resp.status == 400 and body["code"] == "INVALID_PARAMS" and "workload" in body["message"]
    bad = await client.post("/callbacks/pool-ready", json={})
    assert bad.status == 400 and "pool_id" in (await bad.json())["message"]
    pools = (await (await client.get("/v2/pools")).json())["pools"]
    pmd = pools[0]["manager_url"]
    import aiohttp

    async with aiohttp.ClientSession() as session:  # its own session, closed here, not the test client's
        async with session.get(f"{pmd}/v2/pools/nope/status", headers={"X-Correlation-Id": "c-9"}) as r:
            assert r.status == 404 and r.headers["X-Correlation-Id"] == "c-9"
        async with session.post(f"{pmd}/v2/pools/pool-0/reload", json={"new_model_ref": "file:/x.gguf"}) as r:
            # no provisioner behind this pool-managerd: a 503 that says when to come back
            assert r.status == 503 and int(r.headers["Retry-After"]) >= 1 and (await r.json())["retriable"] is True


async def test_after_the_shutdown_grace_running_tasks_end_with_a_canceled_end(aiohttp_server, aiohttp_client, tmp_path):
    import asyncio

    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, tokens_per_s=20, grace_s=0.3)
    body = task(max_tokens=500)  # 25 s at this rate: far past the grace
    assert (await client.post("/v2/tasks", json=body)).status == 202
    stream = asyncio.ensure_future(events_of(client, body["task_id"]))
    await asyncio.wait_for(client.app.shutdown(), 5)  # what SIGTERM runs first
    events = await asyncio.wait_for(stream, 5)
    end = events[-1][1]
    assert events[-1][0] == "end" and end["canceled"] is True and end["reason"] == "shutdown"
    assert not client.app[DRIVER].core.tasks


async def test_queued_progress_is_narrated_and_metrics_follow_started(aiohttp_server, aiohttp_client, tmp_path):
    import asyncio

    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, slots=1, tokens_per_s=100, metrics_interval_ms=100)
    first, second = task(max_tokens=40), task(max_tokens=10)  # second waits about 0.4 s behind first
    assert (await client.post("/v2/tasks", json=first)).status == 202
    assert (await client.post("/v2/tasks", json=second)).status == 202

    async def verbose(tid):
        resp = await client.get(f"/v2/tasks/{tid}/events?verbose=true")
        parser, events = SSEParser(), []
        async for chunk in resp.content.iter_any():
            events += [(k, orjson.loads(d)) for k, d in parser.feed(chunk)]
        return events

    events, plain = await asyncio.gather(verbose(second["task_id"]), events_of(client, second["task_id"]))
    notes = [d["text"] for k, d in events if k == "narration"]
    assert any(n.startswith("Still queued: position 0 of 1") for n in notes), notes
    # A plain reader of a queued task hears its progress too (it once got nothing until started).
    kinds = [k for k, _ in plain]
    queued = [d for k, d in plain[:kinds.index("started")] if k == "metrics"]
    assert queued and all(d["queue_position"] == 0 and "predicted_start_ms" in d for d in queued), plain[:3]
    assert kinds[-1] == "end" and "started" not in kinds[:kinds.index("metrics")]
    # Only the latest progress is kept, for readers while the task waits: a latecomer of the
    # finished task reads the stream from started on.
    late = [k for k, _ in await events_of(client, second["task_id"])]
    assert late[0] == "started" and late[-1] == "end"


async def test_unexpected_errors_and_unknown_routes_get_the_envelope_and_correlation_id(aiohttp_client):

    app = create_app(OrchestratorConfig(), [])

    async def broken(request):
        raise KeyError("boom")
    app.router.add_get("/broken", broken)
    client = await aiohttp_client(app)
    resp = await client.get("/broken", headers={"X-Correlation-Id": "c-500"})
    body = await resp.json()
    assert resp.status == 500 and body["code"] == "INTERNAL" and "c-500" in body["message"]
    assert resp.headers["X-Correlation-Id"] == "c-500"
    missing = await client.get("/v2/nope")
    assert missing.status == 404 and (await missing.json())["code"] == "NOT_FOUND" and missing.headers["X-Correlation-Id"]
    wrong = await client.delete("/v2/tasks")
    assert wrong.status == 405 and (await wrong.json())["code"] == "METHOD_NOT_ALLOWED"


def test_loopback_is_decided_by_address():
    from llama_orch.io.config import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("127.8.9.10") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("127.example.com") and not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")


async def test_an_error_after_the_stream_started_never_writes_a_second_response_into_it(aiohttp_client):
    import aiohttp
    from aiohttp import web

    app = create_app(OrchestratorConfig(), [])

    async def breaks_mid_stream(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"event: token\ndata: {}\n\n")
        raise RuntimeError("a bug after the first frame")
    app.router.add_get("/breaks", breaks_mid_stream)
    client = await aiohttp_client(app)
    resp = await client.get("/breaks")
    body = b""
    try:
        async for chunk in resp.content.iter_any():
            body += chunk
    except aiohttp.ClientPayloadError:
        pass  # the stream is cut: that is how a client learns it broke
    assert body.startswith(b"event: token") and b"HTTP/1.1 500" not in body and b"INTERNAL" not in body


@pytest.mark.parametrize("node_id", ["gpu{1}", "a/b", "register", "-lead", "", " ", "x" * 254, "n 1", 5, None])
async def test_node_ids_that_routes_cannot_match_are_refused(aiohttp_client, node_id):
    # "gpu{1}" once registered, then no heartbeat or deregister could reach it: stale for ever,
    # holding one of the 1024 node places.
    client = await aiohttp_client(create_app(OrchestratorConfig(), [], poll_interval_ms=30))
    resp = await client.post("/v2/nodes/register", json={"node_id": node_id, "base_url": "http://127.0.0.1:1"})
    assert resp.status == 400
    body = await resp.json()
    assert body["code"] == "INVALID_PARAMS" and body["message"].startswith("node_id: expected 1-253 letters")
    assert (await (await client.get("/v2/nodes")).json())["nodes"] == []


async def test_a_valid_node_id_is_reachable_and_register_is_not_also_a_node(aiohttp_server, aiohttp_client, tmp_path):
    pmd = await aiohttp_server(pool_managerd_app(PoolManagerSettings(
        runtime_dir=tmp_path / "engines", watch_interval_ms=20, health_interval_ms=30, provisioner_url=None)))
    client = await aiohttp_client(create_app(OrchestratorConfig(), [], poll_interval_ms=30))
    node_id = "gpu-1.rack_2.example"
    reg = await client.post("/v2/nodes/register", json={"node_id": node_id,
                                                         "base_url": str(pmd.make_url("")).rstrip("/")})
    assert reg.status == 200
    assert (await client.post(f"/v2/nodes/{node_id}/heartbeat", json={})).status == 200
    # the route overlap: OPTIONS /v2/nodes/register advertised DELETE (it matched /v2/nodes/{node_id})
    options = await client.options("/v2/nodes/register")
    assert options.status == 405 and set(options.headers["Allow"].split(",")) == {"POST"}
    assert (await client.delete("/v2/nodes/register")).status == 405
    assert (await client.delete(f"/v2/nodes/{node_id}")).status == 204


def test_pool_managerd_refuses_a_node_id_orchestratord_would_refuse():
    with pytest.raises(ConfigError) as err:
        PoolManagerSettings.from_env({"POOL_MANAGERD_NODE_ID": "gpu{1}"})
    assert str(err.value).startswith("POOL_MANAGERD_NODE_ID='gpu{1}': expected a node id (1-253 letters")
    assert PoolManagerSettings.from_env({"POOL_MANAGERD_NODE_ID": "gpu-1"}).node_id == "gpu-1"
    assert is_node_id(PoolManagerSettings.from_env({}).node_id)  # the host name, or its valid characters


async def test_a_stale_node_does_not_take_down_a_configured_manager_at_the_same_url(aiohttp_server, aiohttp_client,
                                                                                      tmp_path):
    engine = await aiohttp_server(mock_engine_app(MockConfig(slots=1)))
    pmd = await aiohttp_server(pool_managerd_app(PoolManagerSettings(
        runtime_dir=tmp_path / "engines", watch_interval_ms=20, health_interval_ms=30, provisioner_url=None)))
    write_handoff(tmp_path / "engines", Handoff(pool_id="pool-s", replica_id="r0", url=str(engine.make_url("")).rstrip("/"),
                                                slots_total=1, model_id=MODEL))
    pmd_url = str(pmd.make_url("")).rstrip("/")
    client = await aiohttp_client(create_app(OrchestratorConfig(), [pmd_url], poll_interval_ms=30,
                                             node_stale_after_ms=100))

    async def ready():
        r = await client.get("/v2/pools/pool-s/health")
        return r.status == 200 and (await r.json())["ready"]
    await eventually(ready, what="the configured pool")
    assert (await client.post("/v2/nodes/register", json={"node_id": "n1", "base_url": pmd_url})).status == 200

    async def stale():
        return (await (await client.get("/v2/nodes")).json())["nodes"][0]["stale"]
    await eventually(stale, what="the silent node going stale")

    async def polls():
        text = await (await client.get("/metrics")).text()
        line = next(x for x in text.splitlines() if x.startswith('orchd_pool_health_checks_total{outcome="ok",pool_id="pool-s"}'))
        return float(line.split()[-1])
    seen = await polls()

    async def three_more_polls():
        return await polls() >= seen + 3
    await eventually(three_more_polls, what="three more polls of the pool-managerd")
    assert await ready()  # still placed: the configured manager vouches for it


async def test_prometheus_metrics_port_serves_metrics_apart_from_the_api(aiohttp_client, aiohttp_server, tmp_path):
    import aiohttp
    from cluster_support import free_port

    port, pmd_port = free_port(), free_port()
    client = await aiohttp_client(create_app(OrchestratorConfig(), [], metrics_port=port))
    await aiohttp_server(pool_managerd_app(PoolManagerSettings(runtime_dir=tmp_path / "engines", provisioner_url=None,
                                                               metrics_port=pmd_port)))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200 and "orchd_admission_queue_depth" in await r.text()
        async with session.get(f"http://127.0.0.1:{port}/v2/pools") as r:
            assert r.status == 404  # only metrics there
        async with session.get(f"http://127.0.0.1:{pmd_port}/metrics") as r:
            assert r.status == 200 and "pool_handoff_files_processed" in await r.text()
    assert (await client.get("/metrics")).status == 200  # still on the API port too


def test_prometheus_metrics_port_is_checked():
    import pytest

    from llama_orch.io.config import ConfigError, OrchdSettings

    assert OrchdSettings.from_env({"PROMETHEUS_METRICS_PORT": "9090"}).metrics_port == 9090
    assert PoolManagerSettings.from_env({"PROMETHEUS_METRICS_PORT": "9091"}).metrics_port == 9091
    with pytest.raises(ConfigError, match="PROMETHEUS_METRICS_PORT"):
        OrchdSettings.from_env({"PROMETHEUS_METRICS_PORT": "99999"})


async def test_a_queued_tasks_only_reader_leaving_cancels_it_without_waiting_for_a_frame(aiohttp_server, aiohttp_client,
                                                                                        tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, slots=1, tokens_per_s=20)
    busy, queued = task(max_tokens=400), task(max_tokens=10)  # busy holds the only slot for 20 s
    assert (await client.post("/v2/tasks", json=busy)).status == 202
    assert (await client.post("/v2/tasks", json=queued)).status == 202
    driver = client.app[DRIVER]
    resp = await client.get(f"/v2/tasks/{queued['task_id']}/events")
    assert resp.status == 200
    resp.close()  # the reader hangs up while nothing is sent to it (the test server cancels no handler)

    async def canceled():
        return driver.core.task(queued["task_id"]) is None
    await eventually(canceled, timeout=5, what="the queued task canceled once its only reader left")
    await client.post(f"/v2/tasks/{busy['task_id']}/cancel")


# -- streams: retained memory, bounded buffers, ids and resumption, abandoned tasks --------------


def _frames_with_ids(raw: bytes) -> list[tuple[str, int | None]]:
    """(event name, id) of each event of a raw SSE body; the id is None where an event has none."""
    out = []
    for block in raw.decode().split("\n\n")[:-1]:
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        out.append((fields.get("event", "message"), int(fields["id"]) if "id" in fields else None))
    return out


async def test_a_finished_task_keeps_neither_its_prompt_nor_unbounded_frames(aiohttp_server, aiohttp_client,
                                                                            tmp_path):
    # 300 tasks with 900 KB prompts once held 262 MB for 5 minutes: the prompt stayed with the stream.
    # (an engine context that takes the prompt: a prompt over it is refused, as llama-server refuses it)
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, slots=4, tokens_per_s=5000, engine_ctx=65_536)
    driver = client.server.app[DRIVER]
    prompt = "word " * 40_000  # 200 KB
    warm = task(max_tokens=8, prompt=prompt)
    assert (await client.post("/v2/tasks", json=warm)).status == 202
    await events_of(client, warm["task_id"])
    # What orchestratord's code allocated and still holds: not aiohttp's per-connection buffers
    # (bounded by the connections), nor the in-process mock engine's.
    ours = [tracemalloc.Filter(True, "*llama_orch*", all_frames=True),
            tracemalloc.Filter(False, "*mock_engine*", all_frames=True)]
    gc.collect()
    tracemalloc.start(12)
    try:
        before = tracemalloc.take_snapshot().filter_traces(ours)
        bodies = [task(max_tokens=8, prompt=prompt) for _ in range(20)]
        for body in bodies:
            assert (await client.post("/v2/tasks", json=body)).status == 202
        for body in bodies:
            assert (await events_of(client, body["task_id"]))[-1][0] == "end"
        client.engine.app[ENGINE].requests.clear()  # the in-process engine's own record of the prompts
        gc.collect()
        after = tracemalloc.take_snapshot().filter_traces(ours)
    finally:
        tracemalloc.stop()
    per_task = sum(stat.size_diff for stat in after.compare_to(before, "filename")) / len(bodies)
    streams = [driver.streams[b["task_id"]] for b in bodies]
    assert all(s.done and s.payload is NO_PAYLOAD for s in streams)
    assert per_task < 20_000, f"{per_task:.0f} bytes retained per finished task (its prompt is 200,000)"


async def test_an_unread_stream_is_bounded_and_a_late_reader_is_told_of_the_gap(aiohttp_server, aiohttp_client,
                                                                                tmp_path):
    limits = StreamLimits(buffer_frames=6, buffer_bytes=1 << 20)
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, tokens_per_s=200, limits=limits)
    driver = client.server.app[DRIVER]
    body = task(max_tokens=60)
    assert (await client.post("/v2/tasks", json=body)).status == 202
    stream = driver.streams[body["task_id"]]
    await eventually(lambda: stream.done, what="the unread task to finish")
    assert len(stream.frames) <= 6 and stream.skipped > 0  # bounded while nobody read it
    events = await events_of(client, body["task_id"])
    kinds = [k for k, _ in events]
    assert kinds[0] == "started" and kinds[1] == "gap" and kinds[-1] == "end"
    assert events[1][1]["missed_frames"] == stream.skipped and "dropped" in events[1][1]["message"]
    tokens = [d["i"] for k, d in events if k == "token"]
    assert tokens == list(range(tokens[0], 60)), "after the gap, the rest of the tokens in order"


async def test_every_event_batch_has_an_id_and_last_event_id_resumes_after_it(aiohttp_server, aiohttp_client,
                                                                              tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, tokens_per_s=300)
    body = task(max_tokens=30)
    assert (await client.post("/v2/tasks", json=body)).status == 202
    url = f"/v2/tasks/{body['task_id']}/events"
    raw = await (await client.get(url)).read()
    full = _frames_with_ids(raw)
    ids = [i for _, i in full if i is not None]
    assert ids == list(range(len(ids))) and full[-1] == ("end", ids[-1]), full  # frame n carries id n
    assert [k for k, _ in full].count("token") == 30
    for last in (0, len(ids) // 2, ids[-1]):
        resumed = _frames_with_ids(await (await client.get(url, headers={"Last-Event-ID": str(last)})).read())
        after = full[[i for _, i in full].index(last) + 1:]
        assert resumed == after, (last, resumed[:3], after[:3])
    # an empty id is the SSE spec's "none yet": the whole stream (it was a 400)
    assert _frames_with_ids(await (await client.get(url, headers={"Last-Event-ID": ""})).read()) == full
    bad = await client.get(url, headers={"Last-Event-ID": "yesterday"})
    assert bad.status == 400 and "Last-Event-ID" in (await bad.json())["message"]


async def test_a_queued_task_whose_readers_are_all_gone_is_not_dispatched(aiohttp_server, aiohttp_client,
                                                                          tmp_path):
    # 500 readers dropped at once: every queued task was dispatched (a prompt evaluation each)
    # before its own cancel was seen. The disconnects are here before the slot frees.
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, slots=1, tokens_per_s=100)
    driver = client.server.app[DRIVER]
    running, queued = task(max_tokens=500), task(max_tokens=5)
    for body in (running, queued):
        assert (await client.post("/v2/tasks", json=body)).status == 202
    await eventually(lambda: driver.streams[running["task_id"]].started, what="the first task running")

    class Gone:  # the connection of a reader whose disconnect the server has seen, not yet handled
        @staticmethod
        def is_closing() -> bool:
            return True

    driver.reader_joined(queued["task_id"], driver.streams[queued["task_id"]], Gone())
    sent_before = driver.metrics.dispatched.labels(pool_id="pool-0", outcome="completed")._value.get()
    assert (await client.post(f"/v2/tasks/{running['task_id']}/cancel")).status == 204  # the slot frees
    stream = driver.streams[queued["task_id"]]
    await eventually(lambda: stream.done, what="the abandoned task to end")
    assert stream.upstream is None and queued["task_id"] not in driver.core.tasks
    end = [k for k, _ in await events_of(client, queued["task_id"])]
    assert end[-1] == "end" and "token" not in end
    assert driver.metrics.total(driver.metrics.canceled, reason="disconnect") == 1
    assert driver.metrics.dispatched.labels(pool_id="pool-0", outcome="completed")._value.get() == sent_before


async def test_what_the_engine_found_in_its_cache_reaches_the_end_event_the_metric_and_openai_usage(
        aiohttp_server, aiohttp_client, tmp_path):
    from llama_orch.core.placement import Strategy

    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, slots=1, tokens_per_s=5000,
                           placement_strategy=Strategy.PREFIX_AWARE)
    history = " ".join(f"w{i}" for i in range(300))  # a conversation's history, about 1,000 characters
    first = task(prompt=history, max_tokens=4)
    assert (await client.post("/v2/tasks", json=first)).status == 202
    kind, end = (await events_of(client, first["task_id"]))[-1]
    assert kind == "end" and end["cached_tokens"] == 0  # a fresh engine holds nothing
    # the next turn resends the history: the engine's slot still holds it
    second = task(prompt=history + " and more", max_tokens=4)
    assert (await client.post("/v2/tasks", json=second)).status == 202
    end = (await events_of(client, second["task_id"]))[-1]
    assert end[0] == "end" and end[1]["cached_tokens"] == 300
    # the prefix signature was computed from the prompt and recorded for the pool
    placer = client.server.app[DRIVER].core.placer
    assert placer.prefix.blocks("pool-0") > 0
    metrics = await (await client.get("/metrics")).text()
    assert 'prefix_cache_hit_tokens_total{pool_id="pool-0"} 300.0' in metrics
    resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": history + " again", "max_tokens": 2})
    usage = (await resp.json())["usage"]
    assert resp.status == 200 and usage["prompt_tokens_details"] == {"cached_tokens": 300}



async def test_a_silent_pool_managerd_stops_new_dispatches_but_not_the_streams_running(aiohttp_server,
                                                                                       aiohttp_client, tmp_path):
    """The data path does not hang on the control plane: with the pool's manager gone, a stream
    on its healthy engine runs to its end; new tasks stop going there once the pool is stale."""
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, slots=2, tokens_per_s=200, pool_stale_ms=300.0)
    body = task(max_tokens=200)  # a second of streaming
    assert (await client.post("/v2/tasks", json=body)).status == 202
    resp = await client.get(f"/v2/tasks/{body['task_id']}/events")
    parser, events, closed = SSEParser(), [], False
    async for chunk in resp.content.iter_any():
        events += [(name, orjson.loads(data)) for name, data in parser.feed(chunk)]
        if not closed and any(name == "token" for name, _ in events):
            await client.pmd.close()  # the manager goes silent mid-stream
            closed = True
    kind, end = events[-1]
    assert closed and kind == "end" and end["tokens_out"] == 200, events[-1]

    async def refused():
        r = await client.post("/v2/tasks", json=task())
        return r.status == 503 and (await r.json())["code"] == "POOL_UNREADY"
    await eventually(refused, what="new tasks refused once the silent manager's pool is stale")
