"""``llama-orch lab``: the multi-host lab for a person at a terminal.

``lab up`` makes the hosts and starts the cluster, prints how to reach it from the client host,
and returns, leaving it running (its state in ``<dir>/lab.json``); ``lab status`` shows the pools;
``lab fault HOST KIND`` breaks something and ``lab fault HOST heal`` mends everything on that
host; ``lab scenarios`` runs the fault scenarios and writes their table and timelines; ``lab down``
stops every process of the lab and removes its namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

FAULTS = ("partition", "partition-in", "partition-out", "reset", "loss", "slow", "latency", "link-down",
          "kill-engine", "stop-engine", "kill-pool-managerd", "stop-pool-managerd", "heal")


def add_parser(sub) -> None:
    lab = sub.add_parser("lab", help="a multi-host cluster on this machine in network namespaces (root), "
                                     "with faults to try by hand")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", type=Path, default=Path(".lab"), help="the lab's directory (default .lab)")

    up = lab_sub.add_parser("up", help="make the hosts, start the cluster, print how to reach it; it keeps running")
    common(up)
    up.add_argument("--hosts", type=int, default=2, help="worker hosts gpu1..gpuN (default 2)")
    up.add_argument("--pools-per-host", type=int, default=2)
    up.add_argument("--engine", choices=("llama-server", "mock"), default="llama-server")
    up.add_argument("--discovery", choices=("list", "push"), default="list",
                    help="orchestratord's configured list of pool-managerds, or their registration")
    up.add_argument("--prefix", default="lo", help="namespace names: PREFIX-ctrl, PREFIX-gpu1, ... (default lo)")
    up.add_argument("--subnet", default="10.213.77", help="the private /24 used only inside the namespaces")
    up.set_defaults(func=_up)

    down = lab_sub.add_parser("down", help="stop every process of the lab and remove its namespaces")
    common(down)
    down.set_defaults(func=_down)

    st = lab_sub.add_parser("status", help="the lab's hosts and orchestratord's pools")
    common(st)
    st.set_defaults(func=_status)

    fault = lab_sub.add_parser("fault", help="break something on a host (heal mends every fault on it)")
    common(fault)
    fault.add_argument("host", help="gpu1, gpu2, ... (or ctrl/client for the network faults)")
    fault.add_argument("kind", choices=FAULTS)
    fault.add_argument("--percent", type=int, default=5, help="loss: percent of packets dropped (default 5)")
    fault.add_argument("--rate", default="16kbit", help="slow: what the host may send (tc rate, default 16kbit)")
    fault.add_argument("--pool", default=None, help="kill-engine/stop-engine: which pool (default the host's first)")
    fault.set_defaults(func=_fault)

    sc = lab_sub.add_parser("scenarios", help="run the fault scenarios with exact task accounting: a table and "
                                              "a PNG timeline per scenario")
    sc.add_argument("--out", type=Path, default=Path("out/lab"))
    sc.add_argument("--only", nargs="*", default=None, help="scenario names (default all)")
    sc.add_argument("--engine", choices=("llama-server", "mock"), default="llama-server")
    sc.add_argument("--prefix", default="lot")
    sc.add_argument("--subnet", default="10.213.78")
    sc.set_defaults(func=_scenarios)


def _report(line: str) -> None:
    print(f"lab: {line}", file=sys.stderr, flush=True)


def _unavailable() -> int | None:
    from .netns import unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"llama-orch lab: {reason}", file=sys.stderr)
        return 2
    return None


def _up(args: argparse.Namespace) -> int:
    from .cluster import LabCluster, LabConfig, LabError
    from .netns import NetnsError

    if (code := _unavailable()) is not None:
        return code
    try:
        config = LabConfig(workers=args.hosts, pools_per_worker=args.pools_per_host, engine=args.engine,
                           discovery=args.discovery, prefix=args.prefix, subnet=args.subnet, lab_dir=args.dir)
    except ValueError as exc:
        print(f"llama-orch lab up: {exc}", file=sys.stderr)
        return 2
    lab = LabCluster(config, report=_report)
    try:
        asyncio.run(lab.up())
    except (LabError, NetnsError) as exc:
        print(f"llama-orch lab up: {exc}", file=sys.stderr)
        return 1
    client = lab.topology.host("client").netns
    print(f"""The lab is up ({lab.lab_dir}, logs in <host>/logs/):
{_hosts_table(lab)}

From the client host (the root namespace must not talk to these addresses):
  sudo ip netns exec {client} env LLAMA_ORCH_URL={lab.orchestratord_url} LLAMA_ORCH_API_KEY={config.api_key} \\
    {sys.executable} -m llama_orch.cli submit "Once upon a time"
  sudo ip netns exec {client} env LLAMA_ORCH_URL={lab.orchestratord_url} LLAMA_ORCH_API_KEY={config.api_key} \\
    {sys.executable} -m llama_orch.cli status
Break something:  llama-orch lab fault gpu1 partition     (then: llama-orch lab fault gpu1 heal)
Stop it all:      llama-orch lab down""")
    return 0


def _hosts_table(lab) -> str:
    rows = []
    for h in lab.topology.hosts:
        daemons = ", ".join(f"{p.name} ({p.pid})" for p in lab.processes if p.host == h.name)
        rows.append(f"  {h.name:<7} {h.netns:<12} {h.address:<15} {daemons}")
    return "\n".join(rows)


def _attach(args: argparse.Namespace):
    from .cluster import LabCluster

    return LabCluster.attach(args.dir, report=_report)


def _down(args: argparse.Namespace) -> int:
    from .cluster import LabError

    if (code := _unavailable()) is not None:
        return code
    try:
        lab = _attach(args)
    except LabError as exc:
        print(f"llama-orch lab down: {exc}", file=sys.stderr)
        return 1
    for warning in asyncio.run(lab.down()):
        print(f"lab: {warning}", file=sys.stderr)
    print(f"lab down: namespaces {lab.config.prefix}-* removed; logs kept in {lab.lab_dir}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from .cluster import LabError

    try:
        lab = _attach(args)

        async def pools():
            try:
                return await lab.pools()
            finally:
                await lab.agent.close()
        found = asyncio.run(pools())
    except (LabError, OSError) as exc:
        print(f"llama-orch lab status: {exc}", file=sys.stderr)
        return 1
    print(_hosts_table(lab))
    if found is None:
        print("orchestratord does not answer")
    for p in found or ():
        print(f"  {p['pool_id']:<8} {'ready' if p.get('ready') else 'unready':<8} slots {p.get('slots_free')}/"
              f"{p.get('slots_total')} free, {p.get('leases')} leased  {p.get('engine_url')}"
              f"{'  ' + str(p['last_error']) if p.get('last_error') else ''}")
    return 0


def _fault(args: argparse.Namespace) -> int:
    from .cluster import LabError
    from .netns import NetnsError

    if (code := _unavailable()) is not None:
        return code
    try:
        lab = _attach(args)
        print(asyncio.run(apply_fault(lab, args.host, args.kind, percent=args.percent, rate=args.rate,
                                      pool=args.pool)))
    except (LabError, NetnsError) as exc:
        print(f"llama-orch lab fault: {exc}", file=sys.stderr)
        return 1
    return 0


async def apply_fault(lab, host: str, kind: str, *, percent: int = 5, rate: str = "16kbit",
                      pool: str | None = None) -> str:
    """One fault by name on ``host`` (``heal`` mends all of them there); returns what was done."""
    from .cluster import LabError

    topo = lab.topology
    topo.host(host)  # an unknown host is named here
    if kind in ("kill-engine", "stop-engine"):
        pool = pool or lab.pool_ids(host)[0]
        pid = lab.engine_pid(pool)
        os.kill(pid, signal.SIGKILL if kind == "kill-engine" else signal.SIGSTOP)
        return f"{kind}: engine of {pool} (pid {pid})"
    if kind == "kill-pool-managerd":
        await lab.kill(host, "pool-managerd")
        return f"pool-managerd on {host} killed (heal starts it again)"
    if kind == "stop-pool-managerd":
        return f"pool-managerd on {host} stopped (pid {lab.signal(host, 'pool-managerd', signal.SIGSTOP)})"
    if kind == "partition":
        topo.drop_to("ctrl", host)
        topo.drop_to(host, "ctrl")
    elif kind == "partition-in":
        topo.drop_to("ctrl", host)
    elif kind == "partition-out":
        topo.drop_to(host, "ctrl")
    elif kind == "reset":
        topo.reset_to(host, "ctrl")
    elif kind == "loss":
        topo.random_loss(host, percent)
    elif kind == "slow":
        topo.bandwidth(host, rate)
    elif kind == "latency":
        if host != lab.config.latency_host:
            raise LabError(f"latency goes through the delay proxy on {lab.config.latency_host} only")
        lab.signal(host, "delay-proxy", signal.SIGUSR1)
    elif kind == "link-down":
        topo.link(host, False)
    elif kind == "heal":
        return await heal(lab, host)
    return f"{kind} on {host}"


async def heal(lab, host: str) -> str:
    """Every fault on ``host`` undone: rules, link, bandwidth, stopped processes, the delay, and a
    killed pool-managerd started again."""
    topo = lab.topology
    for name in {"ctrl", host}:
        topo.nft_clear(name)
    if topo.host(host).port is not None:
        topo.link(host, True)
    topo.bandwidth_clear(host)
    for pid in topo.pids(topo.host(host).netns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    done = [f"rules, link and bandwidth of {host} reset; its processes continued"]
    if host == lab.config.latency_host:
        lab.signal(host, "delay-proxy", signal.SIGUSR2)
        done.append("delay off")
    for p in lab.processes:
        if p.host == host and not p.running() and p.name == "pool-managerd":
            lab.restart(host, p.name)
            done.append(f"{p.name} started again (pid {p.pid})")
    return "; ".join(done)


def _scenarios(args: argparse.Namespace) -> int:
    if (code := _unavailable()) is not None:
        return code
    from .runner import run_suite

    results, problems = asyncio.run(run_suite(args.out, engine=args.engine, prefix=args.prefix, subnet=args.subnet,
                                              only=args.only, report=_report))
    print((args.out / "scenarios.md").read_text())
    for name, found in problems.items():
        for p in found:
            print(f"FAILED {name}: {p}", file=sys.stderr)
    return 1 if any(problems.values()) else 0
