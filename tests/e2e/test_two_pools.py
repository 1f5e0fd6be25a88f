"""Two pools on loopback, real processes: orchestratord in front of two pool-managerds, each with
its own engine-provisioner and engine (pool-a, pool-b).

Two clusters are shared by the tests that do not disturb them (module scope), each test with its
own orchestratord where it needs other settings:

- ``real``: two real ``llama-server`` engines with the tiny model, 2 slots of 2048 tokens each
  (the model's training context, the most llama-server gives a slot: a 2000-token task lasts
  long enough to be canceled mid-stream). The full flow, cancel mid-stream, deadline checks.
- ``held``: two mock engines (``--mode mock``, llama-server's protocol at 200 tokens/s), 1 slot
  each. The real tiny engine streams about 2000 tokens/s and stops at its 2048-token context, so
  no real task keeps a slot busy for more than about a second; the admission tests need slots
  that stay busy until the test lets go of them, which long mock tasks give.

Tests that drain or kill things start a cluster of their own: real engines for the drain, mock
engines where an engine must hold a request back (a request of the test's own occupies the only
slot, so what orchestratord sends next is dispatched but gets no first token) or must stream
until it is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
from cluster_support import CACHE, Node, Orchd, client_session, client_ssl, task
from multidict import CIMultiDict
from support import eventually, wait_until

from llama_orch.ext.sse import SSEParser

POOLS = ("pool-a", "pool-b")
MODEL = f"file:{CACHE / 'models' / 'tiny.gguf'}"
pytestmark = pytest.mark.timeout(120)

FOREVER = 100_000  # max_tokens of a task that holds its slot until canceled (500 s from the mock engine)
MOCK_CTX = FOREVER + 1024  # a mock engine stops at its context, as llama-server does: room for FOREVER


# -- the cluster --------------------------------------------------------------------------------


def get_json(url: str, timeout: float = 2.0):
    """GET ``url`` as JSON, or None while it does not answer 200 (sync: fixtures, teardown)."""
    try:
        context = client_ssl()
        with urllib.request.urlopen(url, timeout=timeout, context=context if context is not True else None) as resp:
            return json.loads(resp.read()) if resp.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None



@dataclass
class Cluster:
    tmp: Path
    mode: str
    nodes: dict[str, Node] = field(default_factory=dict)
    orchds: list[Orchd] = field(default_factory=list)

    def logs(self) -> str:
        text = "\n".join(f"=== {pool_id}\n{node.logs()}" for pool_id, node in self.nodes.items())
        for log in sorted(self.tmp.glob("orchd-*/orchestratord.log")):
            text += f"\n=== {log.parent.name}\n{log.read_text(errors='replace')[-3000:]}"
        return text

    def manager(self, pool_id: str) -> dict | None:
        """The pool's status from its own pool-managerd (engine_url, engine_pid, slots_free...)."""
        listing = get_json(f"{self.nodes[pool_id].url}/v2/pools")
        return next((p for p in (listing or {}).get("pools", []) if p["pool_id"] == pool_id), None)

    def orchd(self, **env: str) -> Orchd:
        """A new orchestratord in front of both nodes, returned once it sees both pools ready."""
        tmp = self.tmp / f"orchd-{len(self.orchds)}"
        tmp.mkdir()
        env.setdefault("ORCHD_SHUTDOWN_GRACE_MS", "0")  # teardown: cancel what still runs, at once
        orchd = Orchd(tmp, list(self.nodes.values()), **env)
        self.orchds.append(orchd)
        wait_until(lambda: ready_pools(orchd.url) == set(POOLS), 60,
                   f"orchestratord to see {POOLS} ready\n{self.logs()}")
        return orchd

    def close(self) -> None:
        """SIGTERM to every process at once (orchestratords, then each node's provisioner, which
        stops its engine, and pool-managerd), then wait for each; SIGKILL after 20 s."""
        procs = [o.proc for o in self.orchds] + [p for node in self.nodes.values() for p in reversed(node.procs)]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def ready_pools(orchd_url: str) -> set[str] | None:
    listing = get_json(f"{orchd_url}/v2/pools")
    return None if listing is None else {p["pool_id"] for p in listing["pools"] if p["ready"]}


def start_cluster(tmp: Path, *, mode: str, slots: int, ctx: int, engine_args: tuple[str, ...] = ()) -> Cluster:
    """Two nodes, one pool each, both provisioned and ready. Each provisioner gets a cache dir of
    its own (engines linked from the shared cache) so that its engine state file, which a restarted
    provisioner adopts engines from, is not shared with any other provisioner of pool-a or pool-b."""
    cluster = Cluster(tmp, mode)
    try:
        for pool_id in POOLS:
            home = tmp / pool_id
            cache = home / "cache"
            cache.mkdir(parents=True)
            (cache / "engines").symlink_to(CACHE / "engines", target_is_directory=True)
            node = cluster.nodes[pool_id] = Node(home)
            where = ("--pool-id", pool_id)
            if engine_args:  # only a config file carries engine flags
                config = home / "pools.json"
                config.write_text(json.dumps({"pools": [{"pool_id": pool_id, "engine_args": list(engine_args)}]}))
                where = ("--config", str(config))
            node.provision(*where, "--mode", mode, "--slots", str(slots), "--ctx", str(ctx),
                           "--cache-dir", str(cache), "--model", MODEL)
        for pool_id in POOLS:
            wait_until(lambda: (cluster.manager(pool_id) or {}).get("ready"), 90,
                       f"{pool_id} ready on its pool-managerd\n{cluster.logs()}")
    except BaseException:
        cluster.close()
        raise
    return cluster


@pytest.fixture(scope="module")
def real(llama_server, tmp_path_factory):
    """Two real llama-servers (2 slots of 2048 tokens each) and one orchestratord, shared."""
    cluster = start_cluster(tmp_path_factory.mktemp("real"), mode="source", slots=2, ctx=2048)
    try:
        cluster.orchd()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """Two mock engines of one slot each, shared; every test brings its own orchestratord and
    leaves both engine slots free again."""
    cluster = start_cluster(tmp_path_factory.mktemp("held"), mode="mock", slots=1, ctx=MOCK_CTX)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def own(tmp_path):
    """A cluster of two mock engines (1 slot each) for one test that kills things."""
    cluster = start_cluster(tmp_path, mode="mock", slots=1, ctx=MOCK_CTX)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def own_real(llama_server, tmp_path):
    """A cluster of two real llama-servers (1 slot each) for one test that drains a pool."""
    cluster = start_cluster(tmp_path, mode="source", slots=1, ctx=1024)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def real_slot_caches(llama_server, tmp_path):
    """Two real llama-servers (2 slots each) whose KV cache is their slots only: no host-memory
    prompt cache (``--cache-ram 0``), as an engine whose cache is bound by its GPU memory."""
    cluster = start_cluster(tmp_path, mode="source", slots=2, ctx=2048, engine_args=("--cache-ram", "0"))
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
async def session():
    async with client_session(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


# -- client helpers -----------------------------------------------------------------------------


async def submit(session, orchd: Orchd, body: dict) -> tuple[int, dict, CIMultiDict]:
    async with session.post(f"{orchd.url}/v2/tasks", json=body) as r:
        return r.status, await r.json(), r.headers.copy()  # case-insensitive keys


async def admitted(session, orchd: Orchd, **kw) -> dict:
    body = task(**kw)
    body["ctx"] = max(body["ctx"], body["max_tokens"])  # max_tokens must fit in ctx
    status, answer, _ = await submit(session, orchd, body)
    assert status == 202, answer
    return body


async def cancel(session, orchd: Orchd, task_id: str) -> int:
    async with session.post(f"{orchd.url}/v2/tasks/{task_id}/cancel") as r:
        return r.status


class Stream:
    """A task's SSE stream, read in the background; ``events`` fills as frames arrive."""

    def __init__(self, session, orchd: Orchd, task_id: str) -> None:
        self.url = f"{orchd.url}/v2/tasks/{task_id}/events"
        self.session = session
        self.events: list[tuple[str, dict]] = []
        self.status: int | None = None
        self.headers: CIMultiDict = CIMultiDict()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        parser = SSEParser()
        async with self.session.get(self.url) as r:
            self.status, self.headers = r.status, r.headers.copy()
            assert r.status == 200, await r.text()
            async for chunk in r.content.iter_any():
                self.events += [(k, orjson.loads(d)) for k, d in parser.feed(chunk)]

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events if k != "metrics"]

    def of(self, kind: str) -> list[dict]:
        return [d for k, d in self.events if k == kind]

    async def until(self, check, what: str, timeout: float = 30.0):
        async def ready():
            if self.reader.done():
                self.reader.result()  # a failed read fails here, with its cause
            return check(self)
        return await eventually(ready, timeout=timeout, what=f"{what}; events so far {self.kinds()[-8:]}")

    async def finished(self, timeout: float = 30.0) -> "Stream":
        await asyncio.wait_for(asyncio.shield(self.reader), timeout)
        return self

    def close(self) -> None:
        self.reader.cancel()


async def read_all(session, orchd: Orchd, task_id: str, timeout: float = 30.0) -> Stream:
    stream = Stream(session, orchd, task_id)
    await stream.finished(timeout)
    return stream


def check_stream(stream: Stream, terminal: str) -> dict:
    """The contract's shape: tokens indexed 0, 1, 2..., exactly one terminal event, last; returns
    the terminal event's data."""
    kinds = stream.kinds()
    assert stream.status == 200 and stream.headers.get("X-Correlation-Id"), stream.headers
    assert kinds and kinds[-1] == terminal, kinds[-8:]
    assert sum(k in ("end", "error") for k in kinds) == 1, kinds
    # one `started` per dispatch (a retry on another pool gets its own), all before the first token
    started = [i for i, k in enumerate(kinds) if k == "started"]
    assert not started or (started[0] == 0 and "token" not in kinds[:started[-1]]), kinds[:6]
    assert [s["attempt"] for s in stream.of("started")] == list(range(1, len(started) + 1)), stream.of("started")
    assert [t["i"] for t in stream.of("token")] == list(range(len(stream.of("token"))))
    return stream.events[-1][1]


async def metric(session, orchd: Orchd, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` on orchestratord's /metrics whose labels include ``labels``."""
    async with session.get(f"{orchd.url}/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m:
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(2))
    return total


async def orchd_pools(session, orchd: Orchd) -> dict[str, dict]:
    async with session.get(f"{orchd.url}/v2/pools") as r:
        assert r.status == 200
        return {p["pool_id"]: p for p in (await r.json())["pools"]}


async def engine_metric(session, engine_url: str, name: str) -> float:
    """One of llama-server's own metrics (``llamacpp:<name>``), read from the engine."""
    async with session.get(f"{engine_url}/metrics") as r:
        m = re.search(rf"^llamacpp:{name} (\S+)$", await r.text(), re.M)
        assert m, f"engine {engine_url} has no llamacpp:{name}"
        return float(m.group(1))


async def engine_slots_free(cluster: Cluster) -> None:
    """Both engines of a shared mock cluster have their slots free again (cleanup check)."""
    async def free():
        pools = [await asyncio.to_thread(cluster.manager, p) for p in POOLS]
        return all(p and p["ready"] and p["slots_free"] == p["slots_total"] for p in pools)
    await eventually(free, timeout=15, what="engine slots free again after the test")


def assert_backpressure(status: int, body: dict, headers: CIMultiDict, http: int, code: str) -> None:
    assert status == http and body["code"] == code, (status, body)
    assert body["retriable"] is True and isinstance(body["retry_after_ms"], int) and body["retry_after_ms"] >= 1, body
    retry_after = int(headers["Retry-After"])
    assert retry_after >= 1 and retry_after == max(1, math.ceil(body["retry_after_ms"] / 1000)), headers
    assert int(headers["X-Backoff-Ms"]) == body["retry_after_ms"], headers
    assert headers.get("X-Correlation-Id"), headers


async def fill_slots(session, orchd: Orchd, **kw) -> list[dict]:
    """One never-ending task on each pool's only slot, both dispatched (orchestratord counts a lease each).

    They say they will end after 10 tokens (``expected_tokens``): admission predicts starts from the
    work in flight, and told the truth (500 s each) it would refuse every deadline behind them."""
    kw.setdefault("expected_tokens", 10)
    blockers = [await admitted(session, orchd, max_tokens=FOREVER, **kw) for _ in POOLS]
    pools = await orchd_pools(session, orchd)
    assert {p: v["leases"] for p, v in pools.items()} == {p: 1 for p in POOLS}, pools
    return blockers


async def cancel_all(session, orchd: Orchd, bodies: list[dict]) -> None:
    for body in bodies:
        assert await cancel(session, orchd, body["task_id"]) == 204


# -- 1. the full flow over both pools ------------------------------------------------------------


async def test_concurrent_tasks_stream_from_both_real_pools(real, session):
    orchd = real.orchds[0]
    pools = await orchd_pools(session, orchd)
    assert set(pools) == set(POOLS) and all(p["ready"] and p["slots_total"] == 2 for p in pools.values()), pools

    # Six tasks against four slots, submitted together: they overlap, and the last two wait in the queue.
    bodies = [task(max_tokens=300, seed=i) for i in range(6)]
    answers = await asyncio.gather(*(submit(session, orchd, b) for b in bodies))
    assert [s for s, _, _ in answers] == [202] * 6, answers
    streams = await asyncio.gather(*(read_all(session, orchd, b["task_id"]) for b in bodies))

    used = set()
    for body, stream in zip(bodies, streams):
        end = check_stream(stream, "end")
        (started,) = stream.of("started")
        used.add(started["pool_id"])
        tokens = stream.of("token")
        assert len(tokens) == end["tokens_out"] == 300, (len(tokens), end)
        assert "".join(t["t"] for t in tokens).strip(), "real text from the tiny model"
    assert used == set(POOLS), f"both pools should have served some of the tasks, used {used}"
    # Every lease came back.
    assert {p: v["leases"] for p, v in (await orchd_pools(session, orchd)).items()} == {"pool-a": 0, "pool-b": 0}


# -- 2. backpressure: reject ----------------------------------------------------------------------


async def test_full_queue_rejects_with_retry_hints(held, session):
    orchd = held.orchd(ORCHD_ADMISSION_CAPACITY="1", ORCHD_ADMISSION_POLICY="reject")
    live: list[dict] = []
    try:
        live += await fill_slots(session, orchd)
        queued = task(max_tokens=8)
        status, answer, _ = await submit(session, orchd, queued)
        assert status == 202 and answer["queue_position"] == 0 and answer["predicted_start_ms"] > 0, answer
        live.insert(0, queued)

        extra = task(max_tokens=8)
        status, body, headers = await submit(session, orchd, extra)
        assert_backpressure(status, body, headers, 429, "ADMISSION_REJECT")
        assert body["policy_label"] == "reject", body
        async with session.get(f"{orchd.url}/v2/tasks/{extra['task_id']}/events") as r:
            assert r.status == 404  # never admitted
        assert await metric(session, orchd, "admission_backpressure_events_total", policy="reject") == 1

        # The queue, not the pools, was the limit: once the queued task leaves, a newcomer is queued.
        assert await cancel(session, orchd, queued["task_id"]) == 204
        live.remove(queued)
        retry = task(max_tokens=8)
        status, answer, _ = await submit(session, orchd, retry)
        assert status == 202 and answer["queue_position"] == 0, answer
        live.insert(0, retry)
    finally:
        await cancel_all(session, orchd, live)
    await engine_slots_free(held)


# -- 3. backpressure: drop-lru --------------------------------------------------------------------


async def test_drop_lru_evicts_batch_for_interactive_and_refuses_batch(held, session):
    orchd = held.orchd(ORCHD_ADMISSION_CAPACITY="1", ORCHD_ADMISSION_POLICY="drop-lru")
    live: list[dict] = []
    try:
        live += await fill_slots(session, orchd)
        batch = await admitted(session, orchd, priority="batch", max_tokens=8)
        batch_stream = Stream(session, orchd, batch["task_id"])
        await batch_stream.until(lambda s: s.status == 200, "the batch task's stream open")

        # An interactive newcomer finds the queue full: the oldest batch task makes room.
        newcomer = task(max_tokens=8)
        status, answer, _ = await submit(session, orchd, newcomer)
        assert status == 202, answer
        live.insert(0, newcomer)
        await batch_stream.finished()
        error = check_stream(batch_stream, "error")
        assert batch_stream.kinds() == ["error"], batch_stream.kinds()  # never started, no token
        assert error["code"] == "QUEUE_FULL_DROP_LRU" and error["retriable"] is True, error
        assert await metric(session, orchd, "queue_depth", priority="interactive") == 1
        assert await metric(session, orchd, "queue_depth", priority="batch") == 0

        # Only interactive work queued: a batch newcomer may not evict it and is refused.
        late_batch = task(priority="batch", max_tokens=8)
        status, body, headers = await submit(session, orchd, late_batch)
        assert_backpressure(status, body, headers, 429, "QUEUE_FULL_DROP_LRU")
        assert body["policy_label"] == "drop-lru", body

        # Another interactive newcomer evicts the oldest interactive task (no batch left to drop).
        second = task(max_tokens=8)
        status, answer, _ = await submit(session, orchd, second)
        assert status == 202, answer
        live.remove(newcomer)
        live.insert(0, second)
        error = check_stream(await read_all(session, orchd, newcomer["task_id"]), "error")
        assert error["code"] == "QUEUE_FULL_DROP_LRU", error
        assert await metric(session, orchd, "queue_depth", priority="interactive") == 1
    finally:
        await cancel_all(session, orchd, live)
    await engine_slots_free(held)


# -- 4. cancel -----------------------------------------------------------------------------------


async def test_cancel_while_queued_ends_without_a_token(held, session):
    orchd = held.orchd()
    live: list[dict] = []
    try:
        live += await fill_slots(session, orchd)
        queued = await admitted(session, orchd, max_tokens=8)
        live.insert(0, queued)
        stream = Stream(session, orchd, queued["task_id"])
        await stream.until(lambda s: s.status == 200, "the queued task's stream open")
        assert await cancel(session, orchd, queued["task_id"]) == 204
        live.remove(queued)
        end = check_stream(await stream.finished(), "end")
        assert stream.kinds() == ["end"], stream.kinds()  # never started, no token
        assert end["canceled"] is True and end["tokens_out"] == 0, end

        async with session.post(f"{orchd.url}/v2/tasks/{uuid.uuid4()}/cancel") as r:
            assert r.status == 404 and (await r.json())["code"] == "TASK_NOT_FOUND"
    finally:
        await cancel_all(session, orchd, live)
    # The canceled task was never dispatched, not even once the slots came free.
    await engine_slots_free(held)
    assert await metric(session, orchd, "tasks_started_total") == 2


async def test_cancel_while_streaming_from_a_real_engine(real, session):
    orchd = real.orchds[0]
    long = await admitted(session, orchd, max_tokens=2000, ctx=2048)
    stream = Stream(session, orchd, long["task_id"])
    try:
        await stream.until(lambda s: s.of("token"), "the first token")
        assert await cancel(session, orchd, long["task_id"]) == 204
        end = check_stream(await stream.finished(), "end")
    finally:
        stream.close()
    assert end["canceled"] is True, end
    # Tokens already relayed may arrive after the 204 (another connection), but none was sent after
    # the cancel was processed: the stream holds exactly the end event's count, short of the task.
    assert len(stream.of("token")) == end["tokens_out"] < 2000, (len(stream.of("token")), end)


# -- 5. pinning ------------------------------------------------------------------------------------


async def test_pinned_pool_unready_is_503_without_fallback(own_real, session):
    orchd = own_real.orchd()
    async with session.post(f"{orchd.url}/v2/pools/pool-b/drain", json={"deadline_ms": 0}) as r:
        assert r.status == 202, await r.text()

    async def b_unready():
        pools = await orchd_pools(session, orchd)
        return set(pools) == set(POOLS) and not pools["pool-b"]["ready"] and pools["pool-a"]["ready"]
    await eventually(b_unready, timeout=15, what="orchestratord to list pool-b, not ready")

    pinned = task(placement={"mode": "pin", "pin_pool_id": "pool-b"})
    status, body, headers = await submit(session, orchd, pinned)
    assert_backpressure(status, body, headers, 503, "POOL_UNREADY")
    assert body.get("pool_id") == "pool-b", body
    async with session.get(f"{orchd.url}/v2/tasks/{pinned['task_id']}/events") as r:
        assert r.status == 404  # not admitted, so not quietly run on pool-a either
    assert await metric(session, orchd, "tasks_started_total") == 0

    # Even allow_fallback cannot turn a pin into a fallback.
    status, body, _ = await submit(session, orchd, task(placement={"mode": "pin", "pin_pool_id": "pool-b",
                                                                    "allow_fallback": True}))
    assert status == 503 and body["code"] == "POOL_UNREADY", body

    # An unknown pool is a bad parameter, not a wait.
    status, body, headers = await submit(session, orchd, task(placement={"mode": "pin", "pin_pool_id": "pool-zz"}))
    assert status == 400 and body["code"] == "INVALID_PARAMS" and "Retry-After" not in headers, body

    # A soft preference does fall back; a strict one does not; a pin to the ready pool runs there.
    for placement, want in (({"mode": "prefer", "prefer_pools": ["pool-b"]}, "pool-a"),
                            ({"mode": "pin", "pin_pool_id": "pool-a"}, "pool-a")):
        body = await admitted(session, orchd, max_tokens=8, placement=placement)
        stream = await read_all(session, orchd, body["task_id"])
        check_stream(stream, "end")
        assert stream.of("started")[0]["pool_id"] == want, (placement, stream.of("started"))
    status, body, _ = await submit(session, orchd, task(placement={"mode": "prefer", "prefer_pools": ["pool-b"],
                                                                    "allow_fallback": False}))
    assert status == 503 and body["code"] == "POOL_UNAVAILABLE", body
    assert await metric(session, orchd, "tasks_started_total") == 2  # the two refused pins never started


# -- 6. deadlines ----------------------------------------------------------------------------------


async def test_deadline_not_positive_is_400(real, session):
    orchd = real.orchds[0]
    for deadline in (0, -1):
        body = task(deadline_ms=deadline)
        status, answer, headers = await submit(session, orchd, body)
        assert status == 400 and answer["code"] == "DEADLINE_UNMET", answer
        assert answer["retriable"] is False and "Retry-After" not in headers, (answer, headers)
        async with session.get(f"{orchd.url}/v2/tasks/{body['task_id']}/events") as r:
            assert r.status == 404


async def test_deadline_with_busy_slots_refused_or_failed_in_stream(held, session):
    """With every slot busy, admission predicts the start from the work in flight: a deadline
    below the prediction is refused at the door; one above it is admitted and, when the start
    never comes (the running tasks said they would end after 10 tokens and did not), fails in
    its stream with DEADLINE_UNMET."""
    orchd = held.orchd()
    live: list[dict] = []
    try:
        live += await fill_slots(session, orchd)
        status, body, _ = await submit(session, orchd, task(deadline_ms=1, max_tokens=8))
        assert status == 400 and body["code"] == "DEADLINE_UNMET", body

        hopeful = task(deadline_ms=3000, max_tokens=8)  # the 2 s prior service time, less what has run
        submitted = time.monotonic()
        status, answer, _ = await submit(session, orchd, hopeful)
        assert status == 202 and 1 <= answer["predicted_start_ms"] <= 3000, answer
        stream = await read_all(session, orchd, hopeful["task_id"], timeout=20)
        error = check_stream(stream, "error")
        assert stream.kinds() == ["error"], stream.kinds()
        assert error["code"] == "DEADLINE_UNMET", error
        assert time.monotonic() - submitted >= 2.9  # at its deadline, not before
    finally:
        await cancel_all(session, orchd, live)
    await engine_slots_free(held)


# -- 7. losing a pool --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def slot_held(session, engine_url: str):
    """Occupy the engine's only slot with a request of our own: what the orchestrator sends next
    waits inside the engine for a slot, dispatched but without a first token."""
    async with session.post(f"{engine_url}/completion", json={"prompt": "hold", "n_predict": FOREVER,
                                                              "stream": True}) as r:
        assert r.status == 200  # the headers come once the slot is ours
        yield


async def dispatched_to_a_and_waiting(session, cluster: Cluster, orchd: Orchd) -> tuple[dict, Stream]:
    body = await admitted(session, orchd, max_tokens=40, placement={"mode": "prefer", "prefer_pools": ["pool-a"]})
    stream = Stream(session, orchd, body["task_id"])
    await stream.until(lambda s: s.of("started"), "the task started")
    assert stream.of("started")[0]["pool_id"] == "pool-a"
    engine_url = cluster.manager("pool-a")["engine_url"]

    async def waiting_in_engine():
        return await engine_metric(session, engine_url, "requests_deferred") == 1
    await eventually(waiting_in_engine, timeout=10, what="the task waiting for pool-a's engine slot")
    assert not stream.of("token")
    return body, stream


def assert_served_elsewhere(stream: Stream) -> None:
    end = check_stream(stream, "end")
    assert [s["pool_id"] for s in stream.of("started")] == ["pool-a", "pool-b"]  # each dispatch says where
    assert len(stream.of("token")) == end["tokens_out"] == 40, end
    assert end["kv_warmth"] is False, end  # the contract: a failover reports a cold KV cache


async def test_pool_lost_before_first_token_is_retried_on_the_other_pool_and_a_silent_manager_is_not_a_lost_pool(
        own, session):
    orchd = own.orchd()

    # The engine dies while the task waits in it for a slot: the attempt fails before any token.
    engine = own.manager("pool-a")
    b_engine = own.manager("pool-b")["engine_url"]
    async with slot_held(session, engine["engine_url"]):
        body, stream = await dispatched_to_a_and_waiting(session, own, orchd)
        os.kill(engine["engine_pid"], signal.SIGKILL)
        await stream.finished()
    assert_served_elsewhere(stream)
    assert await engine_metric(session, b_engine, "tokens_predicted_total") == 40  # pool-b's engine made them

    # The provisioner restarts the engine; then pool-a's pool-managerd dies while the next task
    # waits in pool-a's engine. The manager's death says nothing about the engine: the task stays
    # and is served there, while pool-a, stale without its manager, takes no new task.
    def restarted():
        status = own.manager("pool-a")
        return status and status["ready"] and status["engine_pid"] != engine["engine_pid"] and status
    engine = wait_until(restarted, 30, f"pool-a's engine restarted\n{own.logs()}")
    await eventually(lambda: asyncio.to_thread(lambda: "pool-a" in (ready_pools(orchd.url) or ())),
                     timeout=15, what="orchestratord to see pool-a ready again")
    async with slot_held(session, engine["engine_url"]):
        body, stream = await dispatched_to_a_and_waiting(session, own, orchd)
        own.nodes["pool-a"].pmd.kill()
        await eventually(lambda: asyncio.to_thread(lambda: "pool-a" not in (ready_pools(orchd.url) or {"pool-a"})),
                         timeout=15, what="pool-a stale without its pool-managerd")
        assert not stream.of("error") and not stream.of("token")  # still waiting for the engine's slot
    await stream.finished()  # the slot is free: pool-a's engine serves the task
    end = check_stream(stream, "end")
    assert [s["pool_id"] for s in stream.of("started")] == ["pool-a"] and end["tokens_out"] == 40
    assert await engine_metric(session, b_engine, "tokens_predicted_total") == 40  # nothing more from pool-b
    assert not (await orchd_pools(session, orchd))["pool-a"]["ready"]


async def test_engine_killed_mid_stream_ends_the_stream_with_worker_reset(own, session):
    orchd = own.orchd()
    body = await admitted(session, orchd, max_tokens=FOREVER, placement={"mode": "pin", "pin_pool_id": "pool-b"})
    stream = Stream(session, orchd, body["task_id"])
    try:
        await stream.until(lambda s: len(s.of("token")) >= 3, "tokens streaming")
        os.kill(own.manager("pool-b")["engine_pid"], signal.SIGKILL)
        error = check_stream(await stream.finished(), "error")
    finally:
        stream.close()
    assert stream.status == 200
    assert error["code"] == "WORKER_RESET" and error["retriable"] is False, error
    assert error.get("pool_id") == "pool-b", error
    assert 3 <= len(stream.of("token")) < FOREVER
    # The orchestrator is fine: the next task runs (on pool-a, or on pool-b's restarted engine).
    after = await admitted(session, orchd, max_tokens=8)
    assert len((await read_all(session, orchd, after["task_id"])).of("token")) == 8



async def test_pool_lost_before_first_token_while_the_other_pool_is_busy_waits_for_a_slot(own, session):
    orchd = own.orchd()
    blocker = await admitted(session, orchd, max_tokens=FOREVER, placement={"mode": "pin", "pin_pool_id": "pool-b"})
    engine = own.manager("pool-a")
    async with slot_held(session, engine["engine_url"]):
        body, stream = await dispatched_to_a_and_waiting(session, own, orchd)
        os.kill(engine["engine_pid"], signal.SIGKILL)

        async def a_unready():
            return not (await orchd_pools(session, orchd))["pool-a"]["ready"]
        await eventually(a_unready, timeout=15, what="orchestratord to see pool-a's engine gone")
        # No other pool had a free slot: the task waits in the queue (or, once pool-a's restarted
        # engine is seen, is sent there again: a `started` of its own), never given up.
        assert set(stream.kinds()) == {"started"}, stream.events[-1]
        assert await cancel(session, orchd, blocker["task_id"]) == 204  # pool-b's slot comes free
        await stream.finished()
    end = check_stream(stream, "end")
    started = [s["pool_id"] for s in stream.of("started")]
    # each dispatch named its pool: pool-a first, then wherever it was sent again (pool-a's restarted
    # engine may be tried before pool-b frees; within max_attempts=3 dispatches in all)
    assert started[0] == "pool-a" and 2 <= len(started) <= 3, started
    assert len(stream.of("token")) == end["tokens_out"] == 40 and end["kv_warmth"] is False, end


# -- prefix-aware placement on real engines -----------------------------------------------------


async def conversation_reuse(session, orchd: Orchd, tag: str, conversations: int = 4, turns: int = 6) -> tuple[int, int]:
    """Chat conversations that share a system prompt and grow turn by turn, sent through the
    OpenAI door without a session (as most chat clients do), one turn of all of them at a time in
    a shuffled order: (prompt tokens the engines found in their KV cache after the first turn,
    the door's estimate of the prompt tokens)."""
    # (the tiny model spends several tokens on a word: this stays well inside a slot's 2048)
    system = {"role": "system", "content": f"{tag}: you are the orchestra's terse assistant."}
    chats = [[system] for _ in range(conversations)]
    cached = prompt = 0

    async def ask(messages: list) -> dict:
        async with session.post(f"{orchd.url}/v1/chat/completions",
                                json={"model": MODEL, "messages": messages, "max_tokens": 8}) as r:
            body = await r.json()
            assert r.status == 200, body
            return body

    for turn in range(turns):
        for c, messages in enumerate(chats):
            words = " ".join(f"{tag}c{c}t{turn}w{k}" for k in range(16))
            messages.append({"role": "user", "content": f"conversation {c}, turn {turn}: {words}"})
        order = random.Random(turn).sample(range(conversations), conversations)  # clients come in any order
        answers = dict(zip(order, await asyncio.gather(*(ask(chats[c]) for c in order))))
        for c, messages in enumerate(chats):
            answer = answers[c]
            usage = answer["usage"]
            assert "prompt_tokens_details" in usage, usage  # llama-server says what it found (timings.cache_n)
            if turn:
                cached += usage["prompt_tokens_details"]["cached_tokens"]
                prompt += usage["prompt_tokens"]
            messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
    return cached, prompt


async def test_prefix_aware_placement_finds_more_of_each_conversation_in_the_engines_caches(real_slot_caches,
                                                                                          session):
    """The same conversations through both strategies (fresh texts each, so neither finds the
    other's), on engines whose cache is their slots: routed by prefix, each turn lands where its
    history is cached; routed by load, on either pool. (With llama-server's default host-memory
    prompt cache both pools keep every history they saw, and load-only routing recovers most of
    it: the README's figures.)"""
    # (slack: one more lease of a 2-slot pool, so two turns arriving together both find their pool)
    by_prefix = real_slot_caches.orchd(ORCHD_PLACEMENT_STRATEGY="prefix-aware", ORCHD_PREFIX_BLOCK_TOKENS="16",
                                       ORCHD_PREFIX_LOAD_SLACK="0.5")
    by_vram = real_slot_caches.orchd()
    prefix_cached, prefix_prompt = await conversation_reuse(session, by_prefix, "alpha")
    vram_cached, vram_prompt = await conversation_reuse(session, by_vram, "bravo")
    assert prefix_prompt > 0 and vram_prompt > 0
    # the same token counts in both runs (tags of one length): the engines' own counts compare
    assert prefix_prompt == vram_prompt
    assert prefix_cached > 1.25 * vram_cached, (prefix_cached, vram_cached)  # 1.4-2.0x in runs here
    hits = await metric(session, by_prefix, "prefix_cache_hit_tokens_total", pool_id="pool-a") + await metric(
        session, by_prefix, "prefix_cache_hit_tokens_total", pool_id="pool-b")
    assert hits >= prefix_cached  # the metric counts every end, the first turn's too
    for orchd in (by_prefix, by_vram):
        orchd.close()
