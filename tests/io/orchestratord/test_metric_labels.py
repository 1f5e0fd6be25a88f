"""orchestratord's metrics carry the labels dashboards filter by, and only bounded values.

The first tests drive the core and ``OrchdMetrics`` directly (every command the core returns is
observed, as the driver does); the last ones go through the HTTP app: refusals on the wire, and
many distinct hostile values that must not grow the scrape."""

from __future__ import annotations

import json
import uuid

from prometheus_client.parser import text_string_to_metric_families
from support import pool, spec

from llama_orch.core.commands import Dispatch, Finish, Rejected
from llama_orch.core.events import (
    DispatchFailed, PoolUpdated, StreamEnded, TaskCanceled, TaskSubmitted, Tick, TokensReceived,
)
from llama_orch.core.orchestrator import Orchestrator, OrchestratorConfig
from llama_orch.core.types import PlacementMode, PlacementRequest, Priority
from llama_orch.io.orchestratord.metrics import OrchdMetrics


class Metered:
    """A core whose every command ``OrchdMetrics`` observes; ``samples()`` reads the scrape back."""

    def __init__(self, **cfg) -> None:
        self.core = Orchestrator(OrchestratorConfig(**cfg))
        self.metrics = OrchdMetrics()

    def __call__(self, event, now: float = 0.0) -> tuple:
        out = self.core.handle(event, now)
        self.metrics.observe(self.core, out, now)
        return out

    def samples(self) -> dict[tuple[str, tuple], float]:
        text = self.metrics.render(self.core).decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def value(self, name: str, **labels: str) -> float:
        """The one sample of ``name`` with exactly these labels (KeyError when there is none)."""
        return self.samples()[(name, tuple(sorted(labels.items())))]


def two_pools(m: Metered) -> None:
    m(PoolUpdated(snapshot=pool("pool-a", engine_version="b100", replica_id="ra", slots_total=1, slots_free=1,
                                vram_free_bytes=30 << 30)))
    m(PoolUpdated(snapshot=pool("pool-b", engine_version="b200", replica_id="rb", slots_total=1, slots_free=1,
                                vram_free_bytes=10 << 30)))


def test_task_series_carry_their_pools_engine_version_and_replica_and_queued_ones_any():
    m = Metered()
    two_pools(m)
    first = spec(prompt_tokens=7)
    out = m(TaskSubmitted(spec=first), 1.0)
    dispatch = next(c for c in out if isinstance(c, Dispatch))
    assert dispatch.pool_id == "pool-a" and dispatch.candidates == 2  # vram-aware: the freer pool, of two
    queued = spec(priority=Priority.BATCH)
    m(TaskSubmitted(spec=spec()), 2.0)  # takes pool-b
    m(TaskSubmitted(spec=queued), 3.0)  # no slot left: queued
    a = dict(engine="llamacpp", engine_version="b100", pool_id="pool-a")
    assert m.value("tasks_started_total", **a, replica_id="ra", priority="interactive") == 1
    assert m.value("tasks_enqueued_total", engine="llamacpp", engine_version="any", pool_id="any", replica_id="any",
                   priority="batch") == 1
    assert m.value("queue_depth", engine="llamacpp", engine_version="any", pool_id="any", priority="batch") == 1
    assert m.value("queue_depth", engine="llamacpp", engine_version="any", pool_id="any", priority="interactive") == 0
    assert m.value("tokens_in_total", **a, replica_id="ra") == 7
    m(TokensReceived(task_id=first.task_id, count=3, attempt=1), 51.0)
    m(TokensReceived(task_id=first.task_id, count=2, attempt=1), 60.0)
    assert m.value("tokens_out_total", **a, replica_id="ra") == 5
    assert m.value("latency_first_token_ms_count", **a, priority="interactive") == 1
    assert m.value("latency_first_token_ms_sum", **a, priority="interactive") == 50.0
    out = m(StreamEnded(task_id=first.task_id, attempt=1, decode_ms=900.0), 950.0)
    assert any(isinstance(c, Finish) and c.engine == "llamacpp" and c.priority is Priority.INTERACTIVE for c in out)
    assert m.value("latency_decode_ms_bucket", **a, priority="interactive", le="1000.0") == 1
    assert m.value("orchd_tasks_finished_total", pool_id="pool-a", outcome="completed") == 1
    # the queued task went to pool-a as the first ended; canceled there, it is counted with its pool
    m(TaskCanceled(task_id=queued.task_id, reason="client"), 960.0)
    assert m.value("tasks_canceled_total", **a, replica_id="ra", reason="client") == 1
    assert m.value("queue_depth", engine="llamacpp", engine_version="any", pool_id="any", priority="batch") == 0
    assert m.value("placement_candidates_considered_count") == 3


def test_a_queued_cancel_is_any_and_an_odd_cancel_reason_other():
    m = Metered()
    m(PoolUpdated(snapshot=pool("pool-a", slots_total=1, slots_free=1)))
    m(TaskSubmitted(spec=spec()), 0.0)
    waiting = spec(priority=Priority.BATCH)
    m(TaskSubmitted(spec=waiting), 0.0)
    m(TaskCanceled(task_id=waiting.task_id, reason="a reason nobody planned"), 1.0)
    assert m.value("tasks_canceled_total", engine="llamacpp", engine_version="any", pool_id="any", replica_id="any",
                   reason="other") == 1


def test_a_pinned_queued_task_is_counted_under_its_pool_and_a_reload_starts_new_series():
    m = Metered()
    m(PoolUpdated(snapshot=pool("pool-a", engine_version="b100", replica_id="ra", slots_total=1, slots_free=1)))
    m(TaskSubmitted(spec=spec()), 0.0)  # takes the only slot
    pinned = spec(placement=PlacementRequest(mode=PlacementMode.PIN, pin_pool_id="pool-a"))
    out = m(TaskSubmitted(spec=pinned), 1.0)
    assert not any(isinstance(c, Dispatch) for c in out)
    assert m.value("queue_depth", engine="llamacpp", engine_version="b100", pool_id="pool-a",
                   priority="interactive") == 1
    assert m.value("tasks_enqueued_total", engine="llamacpp", engine_version="b100", pool_id="pool-a", replica_id="ra",
                   priority="interactive") == 1
    # the engine is reloaded with another version: what follows is counted under it
    m(PoolUpdated(snapshot=pool("pool-a", engine_version="b101", replica_id="ra", slots_total=2, slots_free=2)), 2.0)
    assert m.value("tasks_started_total", engine="llamacpp", engine_version="b101", pool_id="pool-a", replica_id="ra",
                   priority="interactive") == 1
    assert m.value("tasks_started_total", engine="llamacpp", engine_version="b100", pool_id="pool-a", replica_id="ra",
                   priority="interactive") == 1


def test_refusals_are_counted_by_engine_and_code_and_backpressure_by_policy():
    m = Metered(admission_capacity=1)
    m(PoolUpdated(snapshot=pool("pool-a", slots_total=1, slots_free=1)))
    for _ in range(2):
        m(TaskSubmitted(spec=spec()), 0.0)  # running, queued
    out = m(TaskSubmitted(spec=spec(engine="vllm")), 0.0)  # no vllm pool: 503, with its engine
    assert next(c for c in out if isinstance(c, Rejected)).engine == "vllm"
    out = m(TaskSubmitted(spec=spec()), 0.0)  # the queue is full
    refusal = next(c for c in out if isinstance(c, Rejected))
    assert refusal.http_status == 429 and refusal.engine == "llamacpp"  # admission's refusal, given the engine
    assert m.value("tasks_rejected_total", engine="vllm", reason="POOL_UNREADY") == 1
    assert m.value("tasks_rejected_total", engine="llamacpp", reason="ADMISSION_REJECT") == 1
    assert m.value("admission_backpressure_events_total", engine="llamacpp", policy="reject") == 1
    assert m.value("orchd_admission_queue_capacity") == 1
    m.metrics.wire_rejected("INVALID_PARAMS")
    m.metrics.wire_rejected("something a client made up")
    m.metrics.wire_rejected(None)
    assert m.value("tasks_rejected_total", engine="unknown", reason="INVALID_PARAMS") == 1
    assert m.value("tasks_rejected_total", engine="unknown", reason="other") == 2


def test_an_open_breaker_shows_until_the_pool_is_probed_again():
    m = Metered(breaker_threshold=1, breaker_cooldown_ms=1000.0)
    m(PoolUpdated(snapshot=pool("pool-a")))
    m(PoolUpdated(snapshot=pool("pool-b", vram_free_bytes=1 << 30)))
    task = spec()
    out = m(TaskSubmitted(spec=task), 0.0)
    assert next(c for c in out if isinstance(c, Dispatch)).pool_id == "pool-a"
    out = m(DispatchFailed(task_id=task.task_id, attempt=1), 10.0)  # retried on pool-b
    retry = next(c for c in out if isinstance(c, Dispatch))
    assert retry.pool_id == "pool-b" and retry.candidates == 1  # pool-a is out: one left to choose
    assert m.value("orchd_pool_breaker_open", pool_id="pool-a") == 1
    assert m.value("orchd_pool_breaker_open", pool_id="pool-b") == 0
    assert m.value("orchd_pools_available", pool_id="pool-a") == 0
    assert m.value("placement_decisions_total", outcome="retried", pinned="false", fallback="true") == 1
    assert m.core.next_deadline() is not None
    m(Tick(), 1010.0)  # the cooldown over (the core's timer): half open, to be probed by the next task
    assert m.value("orchd_pool_breaker_open", pool_id="pool-a") == 0


def test_labels_never_take_task_session_or_made_up_values():
    m = Metered()
    m(PoolUpdated(snapshot=pool("pool-a")))
    hostile = [spec(task_id=f"task-{uuid.uuid4()}", session_id=f"session-{uuid.uuid4()}",
                    model_ref=f"file:/models/{uuid.uuid4()}.gguf") for _ in range(30)]
    hostile += [spec(placement=PlacementRequest(mode=PlacementMode.PIN, pin_pool_id=f"made-up-{i}")) for i in range(30)]
    hostile += [spec(engine=f"engine-{i}") for i in range(30)]  # the wire layer would refuse these: still bounded
    for s in hostile[:5] + hostile[30:35] + hostile[60:65]:
        m(TaskSubmitted(spec=s), 0.0)
    before = len(m.samples())
    for s in hostile:
        m(TaskSubmitted(spec=s), 0.0)
    text = m.metrics.render(m.core).decode()
    assert len(m.samples()) == before
    for s in hostile:
        assert s.task_id not in text and s.session_id not in text and s.model_ref not in text
    assert "made-up" not in text and "engine-1" not in text
    assert m.value("tasks_rejected_total", engine="other", reason="POOL_UNREADY") == 35


# -- through the HTTP app -----------------------------------------------------------------------


async def test_refusals_before_the_core_count_once_by_their_code(aiohttp_server, aiohttp_client, tmp_path):
    from observability_support import gpu_cluster, scrape, task

    client = await gpu_cluster(aiohttp_server, aiohttp_client, tmp_path)
    wire = [
        client.post("/v2/tasks", data=b"{not json"),
        client.post("/v2/tasks", data=b"[1, 2]"),
        client.post("/v2/tasks", json=task(priority="urgent")),
        client.post("/v2/tasks", json=task(task_id="not-a-uuid")),
        client.post("/v1/chat/completions", data=b"{"),
        client.post("/v1/completions", json={"model": "file:/models/tiny.gguf", "prompt": "x", "n": 3}),
    ]
    for request in wire:
        assert (await request).status == 400
    duplicate = task()
    assert (await client.post("/v2/tasks", json=duplicate)).status == 202
    assert (await client.post("/v2/tasks", json=duplicate)).status == 400  # the driver's refusal
    core_refused = await client.post("/v2/tasks", json=task(ctx=1 << 20))  # above the pools' ctx: the core's 400
    assert core_refused.status == 400
    text = await scrape(client)
    assert 'tasks_rejected_total{engine="unknown",reason="INVALID_PARAMS"} 7.0' in text
    assert 'tasks_rejected_total{engine="llamacpp",reason="INVALID_PARAMS"} 1.0' in text  # not counted twice
    assert "tasks_enqueued_total" in text and text.count("tasks_rejected_total{") == 2


async def test_many_hostile_requests_never_grow_the_scrape(aiohttp_server, aiohttp_client, tmp_path):
    from observability_support import events_of, gpu_cluster, scrape, task

    client = await gpu_cluster(aiohttp_server, aiohttp_client, tmp_path)
    ids: list[str] = []

    def hostile(i: int) -> list[tuple[str, bytes]]:
        task_id, session_id = str(uuid.UUID(int=(i + 1) * 7919)), str(uuid.UUID(int=(i + 1) * 104729))
        ids.extend((task_id, session_id))
        bodies = [
            task(task_id=task_id, session_id=session_id, max_tokens=1),  # admitted
            task(model_ref=f"file:/models/evil-{i}.gguf"),
            task(placement={"mode": "pin", "pin_pool_id": f"evil-pool-{i}"}),
            task(placement={"mode": "prefer", "prefer_pools": [f"evil-pref-{i}"], "avoid_pools": [f"evil-av-{i}"]}),
            task(priority=f"evil-priority-{i}"),
            task(engine=f"evil-engine-{i}"),
            task(workload=f"evil-workload-{i}"),
            task(task_id=f"evil-task-{i}"),
            task(deadline_ms=-i),
        ]
        out = [("/v2/tasks", json.dumps(b).encode()) for b in bodies]
        out += [("/v2/tasks", b'{"task_id": "evil-json-%d' % i),
                ("/v1/chat/completions", json.dumps({"model": f"evil-model-{i}", "max_tokens": 1,
                                                     "messages": [{"role": "user", "content": "x"}]}).encode()),
                ("/v1/completions", json.dumps({"model": "file:/models/tiny.gguf", "prompt": "x", "max_tokens": 1,
                                                "user": f"evil-user-{i}", "n": 2}).encode()),
                ("/v1/chat/completions", b"evil-body-%d" % i)]
        return out

    async def send(requests) -> set[int]:
        statuses = set()
        for path, body in requests:
            resp = await client.post(path, data=body, headers={"Content-Type": "application/json",
                                                                "X-Correlation-Id": f"evil-corr-{uuid.uuid4()}"})
            statuses.add(resp.status)
            if resp.status == 202:  # run it to its end: nothing queues, so no 429 comes and goes
                assert (await events_of(client, (await resp.json())["task_id"]))[-1][0] == "end"
            await resp.read()
        return statuses

    def series(text: str) -> set[str]:
        return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}

    # Every bounded label value these can make, made once: both pools ran tasks, and twice the same
    # prompt on each (the engine then reports its cached prefix, a series of the pool's)
    for pool_id in ("pool-0", "pool-1", "pool-0", "pool-1"):
        body = task(max_tokens=1, placement={"mode": "pin", "pin_pool_id": pool_id})
        assert (await client.post("/v2/tasks", json=body)).status == 202
        assert (await events_of(client, body["task_id"]))[-1][0] == "end"
    await send(hostile(0))
    before = series(await scrape(client))
    statuses = await send([r for i in range(1, 61) for r in hostile(i)])
    assert {202, 400, 404, 503} <= statuses, statuses
    text = await scrape(client)
    assert series(text) - before == set(), "client-chosen values became series"
    assert "evil" not in text
    assert not any(i in text for i in ids)
