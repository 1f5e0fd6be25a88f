"""The lab's fault scenarios, run under open-loop load from the client host, with exact accounting.

A scenario runs the same way every time: load starts (``LoadPlan``: tasks at a steady rate, a
few canceled by the client mid-stream); once the target pool has a stream running (a condition,
with a deadline) the fault is injected; it lasts ``fault_s``; it is healed; once orchestratord
lists every pool ready again the load goes on for ``after_s``, then stops; every task is waited
for, up to the client's own deadline. Then, with nothing sent any more, every pool must come back
to all slots free at orchestratord (no lease leaked) and every engine's own ``/slots`` must show
every slot idle (no orphaned generation), within a deadline.

``account`` turns the client's records into the scenario's row: submitted, completed, errored
by code, rejected (429/503), unreachable, cut, lost (no outcome within the client's deadline: must
be 0), duplicated terminal events, tokens after a terminal event, attempts past the retry budget,
leaked slots, time to route away (the last dispatch to a broken pool after the fault, from the
fault) and time to recover (the first task served to its end by a broken pool after the heal, from
the heal). ``check`` lists what broke the scenario's promises; the test asserts it is empty.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from .cluster import LabCluster, LabError

#: orchestratord's retry budget: attempts per task (``OrchestratorConfig.max_attempts``).
MAX_ATTEMPTS = 3

Action = Callable[[LabCluster], Awaitable[None]]


async def _nothing(lab: LabCluster) -> None:
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    name: str
    title: str
    fault: Action = _nothing
    heal: Action = _nothing
    target: str = ""  # the pool whose stream the fault waits for ("" = any pool)
    broken: tuple[str, ...] = ()  # pools that must stop getting new tasks during the fault
    fault_s: float = 5.0
    allowed: frozenset[str] = frozenset()  # outcome kinds beyond end/error/http allowed here (cut, unreachable)
    proves: tuple[str, ...] = ()  # text orchestratord's log must hold after the fault: the timeout that fired
    route_away_bound_s: float = 4.0
    errors_allowed: bool = True  # False: every task not canceled by the client must end
    min_completed: float = 0.0  # the share of tasks not canceled by the client that must complete
    restarts_orchestratord: bool = False


def _signal(host: str, daemon: str, sig: int) -> Action:
    async def act(lab: LabCluster) -> None:
        lab.signal(host, daemon, sig)
    return act


def _engine_signal(pool_id: str, sig: int) -> Action:
    async def act(lab: LabCluster) -> None:
        os.kill(lab.engine_pid(pool_id), sig)
    return act


def _kill(host: str, daemon: str) -> Action:
    async def act(lab: LabCluster) -> None:
        await lab.kill(host, daemon)
    return act


def _restart(host: str, daemon: str) -> Action:
    async def act(lab: LabCluster) -> None:
        lab.restart(host, daemon)
    return act


def _both(first: Action, second: Action) -> Action:
    async def act(lab: LabCluster) -> None:
        await first(lab)
        await second(lab)
    return act


def _net(fn: Callable[[LabCluster], None]) -> Action:
    async def act(lab: LabCluster) -> None:
        fn(lab)
    return act


def _every_host(lab: LabCluster, fn: Callable[[str], None]) -> None:
    for h in lab.topology.hosts:
        fn(h.name)


def scenarios(lab: LabCluster) -> list[Scenario]:
    """The issue's list, on this lab's hosts: faults on ``gpu1`` (its pools ``gpu1-a``, ``gpu1-b``),
    latency on the worker behind the delay proxy."""
    topo = lab.topology
    gpu1 = lab.pool_ids("gpu1")
    cut = frozenset({"cut", "unreachable"})
    out = [
        Scenario(name="steady", title="steady streaming across all pools", errors_allowed=False),
        Scenario(name="kill-pool-managerd", title="kill -9 pool-managerd on gpu1, restarted after 5 s",
                 fault=_kill("gpu1", "pool-managerd"), heal=_restart("gpu1", "pool-managerd"), broken=tuple(gpu1),
                 target=gpu1[0], errors_allowed=False),
        Scenario(name="sigstop-pool-managerd", title="SIGSTOP pool-managerd on gpu1, SIGCONT after 5 s",
                 fault=_signal("gpu1", "pool-managerd", signal.SIGSTOP),
                 heal=_signal("gpu1", "pool-managerd", signal.SIGCONT), broken=tuple(gpu1), target=gpu1[0],
                 errors_allowed=False, proves=("does not answer",)),
        Scenario(name="sigstop-engine", title="SIGSTOP the engine of gpu1-a mid-stream, SIGCONT after 5 s",
                 fault=_engine_signal(gpu1[0], signal.SIGSTOP), heal=_engine_signal(gpu1[0], signal.SIGCONT),
                 broken=(gpu1[0],), target=gpu1[0], proves=("no token for",)),
        Scenario(name="engine-crash", title="kill -9 the engine of gpu1-a mid-stream (the provisioner restarts it)",
                 fault=_engine_signal(gpu1[0], signal.SIGKILL), broken=(gpu1[0],), target=gpu1[0], fault_s=1.0),
        Scenario(name="link-down", title="gpu1's link down mid-stream, up after 5 s",
                 fault=_net(lambda lab: topo.link("gpu1", False)), heal=_net(lambda lab: topo.link("gpu1", True)),
                 broken=tuple(gpu1), target=gpu1[0], proves=("no token for",)),
        Scenario(name="drop-ctrl-to-gpu1", title="one-way partition: ctrl -> gpu1 dropped (nftables), 5 s",
                 fault=_net(lambda lab: topo.drop_to("ctrl", "gpu1")), heal=_net(lambda lab: topo.nft_clear("ctrl")),
                 broken=tuple(gpu1), target=gpu1[0], proves=("does not answer",)),
        # Only new connections are lost, and the restarted engine needs one: a connect timeout.
        Scenario(name="new-connections-lost",
                 title="new connections ctrl -> gpu1 dropped (SYN, nftables) while gpu1-a's engine restarts, 6 s",
                 fault=_both(_net(lambda lab: topo.drop_new_to("ctrl", "gpu1")),
                             _engine_signal(gpu1[0], signal.SIGKILL)),
                 heal=_net(lambda lab: topo.nft_clear("ctrl")), broken=(gpu1[0],), target=gpu1[0], fault_s=6.0,
                 proves=("connect_s=",), route_away_bound_s=6.0),
        Scenario(name="drop-gpu1-to-ctrl", title="one-way partition: gpu1 -> ctrl dropped (nftables), 5 s",
                 fault=_net(lambda lab: topo.drop_to("gpu1", "ctrl")), heal=_net(lambda lab: topo.nft_clear("gpu1")),
                 broken=tuple(gpu1), target=gpu1[0], proves=("no token for",)),
        Scenario(name="reset-gpu1", title="gpu1 answers ctrl with TCP resets (nftables reject), 5 s",
                 fault=_net(lambda lab: topo.reset_to("gpu1", "ctrl")), heal=_net(lambda lab: topo.nft_clear("gpu1")),
                 broken=tuple(gpu1), target=gpu1[0]),
        Scenario(name="loss-5pct", title="5% random packet loss on every host (nftables numgen), 5 s",
                 fault=_net(lambda lab: _every_host(lab, lambda h: topo.random_loss(h, 5))),
                 # TCP's retransmission backoff can hold one stream past the 2 s between-token limit
                 heal=_net(lambda lab: _every_host(lab, topo.nft_clear)), min_completed=0.9),
        # One FIFO for every connection (this kernel has no fair queueing): streams starve each
        # other, and the between-token timeout ends them.
        Scenario(name="bandwidth-gpu1", title="gpu1 sends at 16 kbit/s (tc tbf), 8 s",
                 fault=_net(lambda lab: topo.bandwidth("gpu1", "16kbit")),
                 heal=_net(lambda lab: topo.bandwidth_clear("gpu1")), target=gpu1[0], fault_s=8.0, broken=tuple(gpu1),
                 # the slow link still carries pool-managerd's polls, so gpu1 looks ready: routing away waits
                 # for the between-token limit (2 s) to fail streams there, then the breaker (4.2-4.5 s seen)
                 proves=("no token for",), route_away_bound_s=6.0),
    ]
    if lab.config.latency_host:
        slow = lab.config.latency_host
        out.append(Scenario(
            name="latency-200ms", title=f"{lab.config.delay_ms:.0f} ms added each way on {slow} (delay proxy), 5 s",
            fault=_signal(slow, "delay-proxy", signal.SIGUSR1), heal=_signal(slow, "delay-proxy", signal.SIGUSR2),
            target=lab.pool_ids(slow)[0], errors_allowed=False))
        # Every token late but none missing: only the stream's total deadline (12 s) ends these.
        out.append(Scenario(
            name="trickle", title=f"{slow}'s traffic paced to one chunk per 300 ms per connection (delay proxy), 15 s",
            fault=_signal(slow, "delay-proxy", signal.SIGHUP), heal=_signal(slow, "delay-proxy", signal.SIGUSR2),
            target=lab.pool_ids(slow)[0], fault_s=15.0, proves=("longer than total_s",)))
    out.append(Scenario(
        name="orchestratord-restart", title="kill -9 orchestratord mid-stream, restarted after 3 s",
        fault=_kill("ctrl", "orchestratord"), heal=_restart("ctrl", "orchestratord"), fault_s=3.0, allowed=cut,
        restarts_orchestratord=True))
    return out


@dataclass(slots=True)
class Result:
    scenario: Scenario
    fault_at: float | None = None
    heal_at: float | None = None
    mid_stream: bool = False
    records: list[dict] = field(default_factory=list)
    timeline: list = field(default_factory=list)
    leaked: int = 0
    leak_detail: str = ""
    proven: dict[str, bool] = field(default_factory=dict)
    restart_knows: str = ""
    correlation: str = ""
    row: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Load:
    # About 1.4 cores of decoding on 2: the daemons must keep some CPU, or health checks and polls
    # miss their deadlines with no fault at all
    rate: float = 4.0
    max_tokens: int = 120
    before_s: float = 3.0
    after_s: float = 4.0
    deadline_s: float = 40.0
    cancel_ratio: float = 0.05


async def run_scenario(lab: LabCluster, scenario: Scenario, load: Load = Load(), *, seed: int = 0) -> Result:
    result = Result(scenario=scenario)
    pools = await lab.wait_ready(30)
    model_ref = pools[0]["model_ref"]
    log_path = lab.process("ctrl", "orchestratord").log_path
    log_offset = log_path.stat().st_size
    run = (await lab.agent.call("POST", "/runs", {
        "url": lab.orchestratord_url, "api_key": lab.config.api_key, "rate": load.rate, "duration_s": 120.0,
        "max_tasks": 2000, "max_tokens": load.max_tokens, "deadline_s": load.deadline_s,
        "cancel_ratio": load.cancel_ratio, "model_ref": model_ref, "seed": seed}))["run"]
    try:
        await _until(lambda p: p["submitted"] >= load.rate * load.before_s, lab, run, load.before_s + 10)
        # Mid-stream: the fault waits for a stream on its target pool, or any pool.
        try:
            await _until(lambda p: p["streaming"].get(scenario.target, 0) > 0 if scenario.target
                         else sum(p["streaming"].values()) > 0, lab, run, 15)
            result.mid_stream = True
        except LabError:
            result.mid_stream = False
        result.fault_at = time.monotonic()
        await scenario.fault(lab)
        await asyncio.sleep(scenario.fault_s)  # the fault's length is the scenario, not a wait for anything
        result.heal_at = time.monotonic()
        await scenario.heal(lab)
        await lab.wait_ready(60)
        await asyncio.sleep(load.after_s)  # load after the heal, to see the broken pools serve again
    finally:
        await lab.agent.call("POST", f"/runs/{run}/stop")
    await _until(lambda p: p["finished"], lab, run, load.deadline_s + 15)
    data = await lab.agent.call("GET", f"/runs/{run}/records")
    result.records, result.timeline = data["records"], data["timeline"]
    result.leaked, result.leak_detail = await quiesced(lab)
    new_log = _read_from(log_path, log_offset) if not scenario.restarts_orchestratord else _read_from(log_path, 0)
    result.proven = {text: text in new_log for text in scenario.proves}
    result.correlation = _correlation(lab, result.records, new_log)
    if scenario.restarts_orchestratord:
        result.restart_knows = await _what_restarted_knows(lab, result)
    result.row = account(result)
    return result


async def _until(done: Callable[[dict], bool], lab: LabCluster, run: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        progress = await lab.agent.call("GET", f"/runs/{run}")
        if done(progress):
            return progress
        lab.check_processes()
        if time.monotonic() > deadline:
            raise LabError(f"load run {run}: condition not reached within {timeout_s:g} s ({progress})")
        await asyncio.sleep(0.05)


async def quiesced(lab: LabCluster, timeout_s: float = 30.0) -> tuple[int, str]:
    """Wait until every pool has every slot free at orchestratord (no lease) and every engine's
    ``/slots`` shows every slot idle; what is still busy at the deadline is the leak."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy, detail = 0, []
        pools = await lab.pools() or []
        for p in pools:
            held = max(int(p.get("leases") or 0), int(p.get("slots_total") or 0) - int(p.get("slots_free") or 0))
            if held:
                busy += held
                detail.append(f"{p['pool_id']}: {p.get('leases')} leases, {p.get('slots_free')}/{p.get('slots_total')} free")
            if p.get("engine_url"):
                answer = await lab.agent.probe(p["engine_url"].rstrip("/") + "/slots")
                slots = answer.get("body") if answer.get("status") == 200 else None
                if isinstance(slots, list):
                    running = sum(1 for s in slots if s.get("is_processing"))
                    if running:
                        busy += running
                        detail.append(f"{p['pool_id']}: engine has {running} slot(s) processing")
        if len(pools) < len(lab.pool_ids()):
            busy += 1
            detail.append(f"only {len(pools)} pools listed")
        if busy == 0:
            return 0, ""
        if time.monotonic() > deadline:
            return busy, "; ".join(detail)
        await asyncio.sleep(0.2)


def _read_from(path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _correlation(lab: LabCluster, records: list[dict], log: str) -> str:
    """Each task that failed an attempt or ended in error has its correlation id on the log lines
    about it: ``k/n`` of them found in orchestratord's log with their task id."""
    wanted = [r for r in records if r["admitted"] == 202 and (r["outcome"] or "").startswith("error:")]
    lines = [line for line in log.splitlines() if "correlation_id=" in line]
    found = sum(1 for r in wanted if any(r["correlation_id"] in line and r["task_id"] in line for line in lines))
    return f"{found}/{len(wanted)}"


async def _what_restarted_knows(lab: LabCluster, result: Result) -> str:
    """Ask the restarted orchestratord about the tasks cut by its predecessor's death."""
    cut = [r for r in result.records if r["outcome"] == "cut"][:20]
    known = 0
    for r in cut:
        answer = await lab.agent.probe(f"{lab.orchestratord_url}/v2/tasks/{r['task_id']}/events",
                                       headers=lab.client_headers, timeout_s=2)
        known += answer.get("status") == 200
    return f"{known}/{len(cut)} cut tasks known after the restart"


def account(result: Result) -> dict:
    s = result.scenario
    records = result.records
    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[r["outcome"] or "none"] = outcomes.get(r["outcome"] or "none", 0) + 1
    errored = {k.split(":", 1)[1]: v for k, v in outcomes.items() if k.startswith("error:")}
    broken = set(s.broken)
    route_away = recover = None
    if broken and result.fault_at is not None:
        during = [d[0] for r in records for d in r["dispatches"]
                  if d[1] in broken and result.fault_at <= d[0] < (result.heal_at or d[0] + 1)]
        route_away = max(during) - result.fault_at if during else 0.0
        served = [r["dispatches"][-1][0] for r in records if r["outcome"] == "end" and r["dispatches"]
                  and r["dispatches"][-1][1] in broken and r["dispatches"][-1][0] >= result.heal_at]
        recover = min(served) - result.heal_at if served else None
    return {
        "scenario": s.name,
        "submitted": len(records),
        "completed": outcomes.get("end", 0),
        "canceled": outcomes.get("canceled", 0),
        "errored": errored,
        "rejected": sum(v for k, v in outcomes.items() if k in ("http:429", "http:503")),
        "other_http": sum(v for k, v in outcomes.items() if k.startswith("http:") and k not in ("http:429", "http:503")),
        "unreachable": outcomes.get("unreachable", 0),
        "cut": outcomes.get("cut", 0),
        "lost": outcomes.get("lost", 0) + outcomes.get("none", 0),
        "duplicated": sum(1 for r in records if r["terminals"] > 1),
        "tokens_after_terminal": sum(r["tokens_after_terminal"] for r in records),
        "over_budget": sum(1 for r in records if len(r["dispatches"]) > MAX_ATTEMPTS),
        "leaked": result.leaked,
        "route_away_s": None if route_away is None else round(route_away, 2),
        "recover_s": None if recover is None else round(recover, 2),
        "mid_stream": result.mid_stream,
        "pools_used": sorted({d[1] for r in records for d in r["dispatches"]}),
        "proven": result.proven,
        "correlation": result.correlation,
        "restart_knows": result.restart_knows,
    }


def check(result: Result, lab: LabCluster) -> list[str]:
    """What broke the scenario's promises (empty: it held)."""
    s, row = result.scenario, result.row
    problems = []
    for key in ("lost", "duplicated", "tokens_after_terminal", "over_budget", "leaked", "other_http"):
        if row[key]:
            problems.append(f"{key} = {row[key]}" + (f" ({result.leak_detail})" if key == "leaked" else ""))
    for kind in ("cut", "unreachable"):
        if row[kind] and kind not in s.allowed:
            problems.append(f"{row[kind]} tasks {kind}")
    if not s.errors_allowed:
        if row["errored"] or row["rejected"]:
            problems.append(f"errors where none are allowed: {row['errored']}, rejected {row['rejected']}")
    ran = row["submitted"] - row["canceled"]
    if ran and row["completed"] < s.min_completed * ran:
        problems.append(f"only {row['completed']} of {ran} tasks completed (at least {s.min_completed:.0%} must)")
    if not result.mid_stream:
        problems.append("no stream was running on the target when the fault came")
    if s.broken:
        if row["route_away_s"] is None or row["route_away_s"] > s.route_away_bound_s:
            problems.append(f"new tasks still went to {', '.join(s.broken)} {row['route_away_s']} s into the fault "
                            f"(bound {s.route_away_bound_s:g} s)")
        if row["recover_s"] is None:
            problems.append(f"no task served to its end by {', '.join(s.broken)} after the heal")
    if s.name == "steady" and set(row["pools_used"]) != set(lab.pool_ids()):
        problems.append(f"steady load used only {row['pools_used']}")
    for text, seen in result.proven.items():
        if not seen:
            problems.append(f"orchestratord's log does not show {text!r}: that timeout did not fire")
    found, _, wanted = result.correlation.partition("/")
    if found != wanted:
        problems.append(f"correlation ids on the log lines of failed tasks: only {result.correlation}")
    return problems
