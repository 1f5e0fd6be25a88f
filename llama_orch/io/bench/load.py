"""``llama-orch bench load``: orchestratord beside its baselines, as a user deploys it.

Every case starts its own processes: fast engines (``fast_engine``, the engine is never the
bottleneck), orchestratord as the daemon runs (``python -m llama_orch.io.orchestratord``, its
pools found by polling the engines' ``/v2/pools``), and the baselines of ``baselines/`` facing
the same engines. The server under test is pinned to CPU 0 with ``taskset`` (where there is
one), engines and the load generator to the other CPUs; each measured run is one load
generator process (``client``) that samples the server's CPU time and memory from ``/proc`` at
the edges of its window. Rounds are interleaved (every target once per round, the order
rotated), and each figure is the median of the rounds with their range beside it.

Targets: ``engine`` (the engine alone, ``/v1/completions``), ``relay`` (the minimal relay),
``orchd-v1`` (orchestratord's ``/v1/completions``), ``two-step`` (the minimal POST-then-GET
relay), ``orchd-v2`` (``POST /v2/tasks`` then its SSE stream), ``bare`` (aiohttp + orjson, a
202 and nothing else) and ``orchd-admit`` (``POST /v2/tasks`` alone). Ratios pair each
orchestratord target with its baseline: v1/relay, v2/two-step, admit/bare.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .report import plots, table

MODEL = "fast.gguf"
ENGINES = 2
ENGINE_SLOTS = 256

#: target -> (process, shape, dialect)
TARGETS = {
    "engine": ("engine", "v1", "openai"),
    "relay": ("relay", "v1", "openai"),
    "orchd-v1": ("orchd", "v1", "openai"),
    "two-step": ("two-step", "v2", "llamacpp"),
    "orchd-v2": ("orchd", "v2", "orchd-sse"),
    "bare": ("bare", "admit", "orchd-sse"),
    "orchd-admit": ("orchd", "admit", "orchd-sse"),
    # the tracing case: the same daemon exporting every span over OTLP/HTTP to a loopback sink, and
    # (``--before TREE``) the daemon of another checkout, e.g. the commit before tracing existed
    "orchd-v2-traced": ("orchd-traced", "v2", "orchd-sse"),
    "orchd-v2-before": ("orchd-before", "v2", "orchd-sse"),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    name: str
    title: str
    targets: tuple[str, ...]
    tokens: int = 50
    concurrency: int | None = None
    rate: float | None = None
    engine_mode: str = "burst"
    engine_args: tuple[str, ...] = ()
    duration_s: float = 5.0
    warmup_s: float = 1.0
    rounds: int = 3
    max_tasks: int | None = None
    orchd_env: tuple[tuple[str, str], ...] = ()
    idle_s: float = 0.0  # after the runs: orchestratord's CPU and memory with no traffic for this long
    before: str | None = None  # the checkout whose orchestratord is the orchd-v2-before target


STREAM_TARGETS = ("engine", "relay", "orchd-v1", "two-step", "orchd-v2")


def cases(quick: bool, before: Path | None = None) -> list[Case]:
    """The runs of one ``bench load``: the issue's table, then a sweep of offered load."""
    d, w, r = (0.6, 0.3, 1) if quick else (5.0, 1.0, 3)
    queued = 2_000 if quick else 100_000
    tracing_targets = ("orchd-v2", "orchd-v2-traced", *(("orchd-v2-before",) if before is not None else ()))
    return [
        Case(name="closed-50", title="closed loop, 64 in flight, 50 tokens in one burst", targets=STREAM_TARGETS,
             tokens=50, concurrency=64, duration_s=d, warmup_s=w, rounds=r),
        Case(name="closed-8", title="closed loop, 64 in flight, 8 tokens", targets=STREAM_TARGETS,
             tokens=8, concurrency=64, duration_s=d, warmup_s=w, rounds=r),
        Case(name="open-1000", title="open loop 1000 tasks/s, 50 tokens in one burst", targets=STREAM_TARGETS,
             tokens=50, rate=200.0 if quick else 1000.0, duration_s=d, warmup_s=w, rounds=r),
        Case(name="open-500-paced", title="open loop 500 tasks/s, 50 tokens paced 2 ms", targets=STREAM_TARGETS,
             tokens=50, rate=100.0 if quick else 500.0, engine_mode="paced", engine_args=("--pace-ms", "2"),
             duration_s=d, warmup_s=w, rounds=r),
        Case(name="relay-tokens", title="closed loop, 16 in flight, 2000 tokens, 50 per engine write",
             targets=("engine", "relay", "orchd-v1", "orchd-v2"), tokens=200 if quick else 2000, concurrency=16,
             engine_mode="per-token", engine_args=("--tokens-per-write", "50"), duration_s=d, warmup_s=w, rounds=r),
        # The engines hold every slot (no first token for an hour), so admitted tasks stay queued.
        Case(name="admission", title="admission alone (POST -> 202), tasks queued", targets=("bare", "orchd-admit"),
             concurrency=64, engine_mode="paced", engine_args=("--first-token-ms", "3600000"),
             duration_s=d if quick else 15.0, warmup_s=w, rounds=r, max_tasks=queued // max(1, r),
             orchd_env=(("ORCHD_ADMISSION_CAPACITY", str(queued * 2)),), idle_s=1.0 if quick else 5.0),
        Case(name="tracing", title="closed loop, 64 in flight, 50 tokens: tracing off, on (every span exported)"
                                   + (", and the checkout before" if before is not None else ""),
             targets=tracing_targets, tokens=50, concurrency=64, duration_s=d, warmup_s=w,
             rounds=r if quick else 5, before=str(before) if before is not None else None),
    ]


SWEEP_RATES = (250.0, 500.0, 1000.0, 1500.0, 2000.0)
SWEEP_TARGETS = ("relay", "orchd-v1", "orchd-v2")


# -- processes ----------------------------------------------------------------------------------

def cpu_plan() -> tuple[list[str], list[str]]:
    """``taskset`` prefixes: (server under test, everything else). None without taskset or with one CPU."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not shutil.which("taskset") or len(cpus) < 2:
        return [], []
    return ["taskset", "-c", str(cpus[0])], ["taskset", "-c", ",".join(str(c) for c in cpus[1:])]


@dataclass(slots=True)
class Proc:
    name: str
    popen: subprocess.Popen
    url: str
    log: Path
    started: dict = field(default_factory=dict)  # CPU and memory once ready, before any load

    @property
    def pid(self) -> int:
        return self.popen.pid


class Processes:
    """The processes of one case: started pinned, stopped (SIGTERM, then SIGKILL) whatever happens."""

    def __init__(self, logs: Path, server_cpu: list[str], other_cpu: list[str], progress: Callable[[str], None]) -> None:
        self.logs = logs
        self.server_cpu, self.other_cpu = server_cpu, other_cpu
        self.progress = progress
        self.procs: dict[str, Proc] = {}

    def start(self, name: str, module: str, args: list[str], *, server: bool, env: dict[str, str] | None = None,
              ready: str = "line", ready_path: str = "/readyz", url: str | None = None) -> Proc:
        log = self.logs / f"{name}.log"
        cmd = [*(self.server_cpu if server else self.other_cpu), sys.executable, "-m", module, *args]
        handle = log.open("wb")
        popen = subprocess.Popen(cmd, stdout=subprocess.PIPE if ready == "line" else handle, stderr=handle,
                                 env={**os.environ, **(env or {})}, start_new_session=True)
        proc = Proc(name, popen, url or "", log)
        self.procs[name] = proc
        if ready == "line":
            proc.url = _ready_line(popen, log, deadline_s=30)
            threading.Thread(target=_drain, args=(popen.stdout, handle), daemon=True).start()
        else:
            _wait_ready(proc, ready_path, deadline_s=60)
        from .client import process_sample

        proc.started = process_sample(popen.pid)
        return proc

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()
        self.procs.clear()


def _ready_line(popen: subprocess.Popen, log: Path, deadline_s: float) -> str:
    """The URL from a child's ``READY http://...`` line, or an error naming its log."""
    result: list[str] = []

    def read() -> None:
        assert popen.stdout is not None
        for raw in popen.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("READY "):
                result.append(line.split(" ", 1)[1])
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(deadline_s)
    if not result:
        raise RuntimeError(f"{' '.join(map(str, popen.args))} did not say READY within {deadline_s:g} s (see {log})")
    return result[0]


def _drain(stream, sink) -> None:
    for raw in stream:
        sink.write(raw)


def _wait_ready(proc: Proc, path: str, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} before it was ready (see {proc.log})")
        try:
            with urllib.request.urlopen(proc.url + path, timeout=2) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)  # polling a child's readiness probe, bounded by the deadline
    raise RuntimeError(f"{proc.name} not ready within {deadline_s:g} s ({last}; see {proc.log})")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_case(case: Case, procs: Processes) -> dict[str, str]:
    """Engines, orchestratord and the baselines this case needs; their URLs by process name."""
    needed = {TARGETS[t][0] for t in case.targets}
    engines = [procs.start(f"engine-{i}", "llama_orch.io.bench.fast_engine",
                           ["--port", "0", "--mode", case.engine_mode, "--slots", str(ENGINE_SLOTS),
                            "--model", MODEL, "--pool-id", f"fast-{i}", *case.engine_args], server=False)
               for i in range(ENGINES)]
    urls = {"engine": engines[0].url}
    engine_list = ",".join(e.url for e in engines)
    for name, module in (("relay", "relay"), ("two-step", "relay_two_step"), ("bare", "bare_admission")):
        if name in needed:
            upstream = [] if name == "bare" else ["--engines", engine_list]
            urls[name] = procs.start(name, f"llama_orch.io.bench.baselines.{module}", ["--port", "0", *upstream],
                                     server=True).url
    env = {"ORCHD_POOL_POLL_INTERVAL_MS": "1000", "ORCHD_ADMISSION_CAPACITY": "100000",
           "ORCHD_STREAM_TIMEOUT_MS": "3600000", **dict(case.orchd_env)}
    variants = {"orchd": {}, "orchd-before": {}}
    if "orchd-traced" in needed:
        sink = procs.start("otlp-sink", "llama_orch.io.bench.otlp_sink", ["--port", "0"], server=False).url
        variants["orchd-traced"] = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink, "OTEL_SERVICE_NAME": "orchestratord-bench"}
    if "orchd-before" in needed:
        if case.before is None:
            raise ValueError("the orchd-v2-before target needs --before TREE")
        variants["orchd-before"] = {"PYTHONPATH": case.before}  # that checkout's llama_orch, built in place
    for name, more in variants.items():
        if name in needed:
            port = _free_port()
            urls[name] = procs.start(name, "llama_orch.io.orchestratord",
                                     ["--bind", f"127.0.0.1:{port}", "--pool-managers", engine_list], server=True,
                                     env={**env, **more}, ready="http", url=f"http://127.0.0.1:{port}").url
    return urls


# -- runs ---------------------------------------------------------------------------------------

def run_client(spec: dict, other_cpu: list[str], timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [*other_cpu, sys.executable, "-m", "llama_orch.io.bench.client", json.dumps(spec), str(out)]
        done = subprocess.run(cmd, capture_output=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"load generator failed ({done.returncode}): "
                               f"{done.stderr.decode(errors='replace')[-2000:]}")
        return json.loads(out.read_bytes())


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarise(result: dict) -> dict:
    """One run's figures from the client's per-task record and the server's samples."""
    rec, window = result["record"], result["window_s"]
    outcomes = rec["outcome"]
    ok = [i for i, o in enumerate(outcomes) if o == "ok"]
    admit = [rec["admitted"][i] - rec["scheduled"][i] for i in ok]
    ttft = [rec["first"][i] - rec["scheduled"][i] for i in ok if rec["first"][i] is not None]  # JSON null: none
    total = [rec["ended"][i] - rec["scheduled"][i] for i in ok]
    tokens = sum(rec["tokens"][i] for i in ok)
    errors: dict[str, int] = {}
    for o in outcomes:
        if o != "ok":
            errors[o] = errors.get(o, 0) + 1
    unfinished = max(0, result["sent"] - len(outcomes))
    if unfinished:
        errors["unfinished"] = unfinished
    # Completions over the time they took: a saturated server finishes a window's tasks late, and
    # counting them over the window alone would credit it with the offered rate.
    span = max([window] + [rec["ended"][i] / 1000 for i in ok])
    out = {"tasks": len(outcomes), "ok": len(ok), "errors": errors, "tasks_per_s": len(ok) / span if span else 0,
           "tokens": tokens, "tokens_per_s": tokens / span if span else 0,
           "admission_ms": {f"{q:g}": percentile(admit, q) for q in (50, 99, 99.9)},
           "ttft_ms": {f"{q:g}": percentile(ttft, q) for q in (50, 99, 99.9)},
           "total_ms": {f"{q:g}": percentile(total, q) for q in (50, 99)}, "window_s": window}
    server = result.get("server") or {}
    start, end = server.get("start"), server.get("end")
    if start and end:
        cpu = end["cpu_s"] - start["cpu_s"]
        out["server_cpu_s"] = cpu
        out["server_cpu_share"] = cpu / max(1e-9, end["t"] - start["t"])
        out["cpu_us_per_task"] = cpu * 1e6 / len(ok) if ok else None
        out["cpu_us_per_token"] = cpu * 1e6 / tokens if tokens else None
        out["tokens_per_cpu_s"] = tokens / cpu if cpu > 0 else None
        out["rss_bytes"] = end["rss_bytes"]
    return out


def median_range(values: list[float | None]) -> dict | None:
    got = [v for v in values if v is not None]
    if not got:
        return None
    return {"median": statistics.median(got), "min": min(got), "max": max(got)}


def combine(runs: list[dict]) -> dict:
    """The rounds of one target: the median and the range of each figure."""
    figures: dict = {"rounds": len(runs)}
    for key in ("tasks_per_s", "tokens_per_s", "cpu_us_per_task", "cpu_us_per_token", "tokens_per_cpu_s",
                "rss_bytes", "server_cpu_share"):
        figures[key] = median_range([r.get(key) for r in runs])
    for key in ("admission_ms", "ttft_ms", "total_ms"):
        figures[key] = {q: median_range([r[key][q] for r in runs]) for q in runs[0][key]}
    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    figures["errors"] = errors
    figures["tasks"] = sum(r["tasks"] for r in runs)
    figures["per_round_tasks_per_s"] = [r["tasks_per_s"] for r in runs]  # for ratios round by round
    return figures


def client_spec(case: Case, target: str, urls: dict[str, str], pids: dict[str, int], *, round_no: int,
                rate: float | None = None) -> dict:
    process, shape, dialect = TARGETS[target]
    return {"url": urls[process], "shape": shape, "dialect": dialect, "tokens": case.tokens, "model": MODEL,
            "concurrency": case.concurrency if rate is None else None, "rate": rate or case.rate,
            "duration_s": case.duration_s, "warmup_s": case.warmup_s, "max_tasks": case.max_tasks,
            "seed": round_no, "watch_pid": pids.get(process),
            "task_timeout_s": 60.0}


def run_case(case: Case, logs: Path, progress: Callable[[str], None], keep: list[dict]) -> dict:
    """Every target of ``case`` for its rounds, interleaved; figures per target, and raw records."""
    server_cpu, other_cpu = cpu_plan()
    procs = Processes(logs, server_cpu, other_cpu, progress)
    runs: dict[str, list[dict]] = {t: [] for t in case.targets}
    extra: dict = {}
    try:
        urls = start_case(case, procs)
        pids = {name: p.pid for name, p in procs.procs.items()}
        for r in range(case.rounds):
            order = list(case.targets[r % len(case.targets):] + case.targets[:r % len(case.targets)])
            for target in order:
                progress(f"{case.name}: round {r + 1}/{case.rounds}, {target}")
                result = run_client(client_spec(case, target, urls, pids, round_no=r), other_cpu,
                                    timeout_s=case.warmup_s + case.duration_s + 180)
                runs[target].append(summarise(result))
                keep.append({"case": case.name, "target": target, "round": r, "record": result["record"]})
        if case.idle_s and "orchd" in procs.procs:
            extra["idle"] = idle_sample(procs.procs["orchd"], case, progress)
        if "orchd" in procs.procs:
            extra["gc"] = gc_pauses(urls["orchd"])
    finally:
        procs.stop()
    return {"case": asdict(case), "targets": {t: combine(v) for t, v in runs.items() if v}, **extra}


def idle_sample(orchd: Proc, case: Case, progress: Callable[[str], None]) -> dict:
    """orchestratord with its queue full and no traffic: CPU share and memory per queued task."""
    from .client import process_sample

    queued = _queue_depth(orchd.url)
    progress(f"{case.name}: {queued} tasks queued; orchestratord idle for {case.idle_s:g} s")
    before = process_sample(orchd.pid)
    time.sleep(case.idle_s)  # the measurement window itself
    after = process_sample(orchd.pid)
    baseline_rss = orchd.started.get("rss_bytes")
    return {"queued": queued, "cpu_share": (after["cpu_s"] - before["cpu_s"]) / max(1e-9, after["t"] - before["t"]),
            "rss_bytes": after["rss_bytes"], "baseline_rss_bytes": baseline_rss,
            "bytes_per_queued_task": (after["rss_bytes"] - baseline_rss) / queued if queued and baseline_rss else None}


def _queue_depth(url: str) -> int:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    depth = 0
    for line in text.splitlines():
        if line.startswith("queue_depth"):
            depth += int(float(line.rsplit(" ", 1)[1]))
    return depth


def gc_pauses(url: str) -> dict:
    """orchestratord's own record of its garbage collector's pauses (``orchd_gc_pause_seconds``)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict = {"collections": 0, "under_10ms": 0}
    for line in text.splitlines():  # summed over the generation label
        value = line.rsplit(" ", 1)[-1]
        if line.startswith("orchd_gc_pause_seconds_count"):
            out["collections"] += int(float(value))
        elif line.startswith("orchd_gc_pause_seconds_bucket") and 'le="0.01"' in line:
            out["under_10ms"] += int(float(value))
        elif line.startswith("orchd_gc_pause_max_seconds"):
            out["max_ms"] = float(value) * 1000
    out["over_10ms"] = out["collections"] - out["under_10ms"]
    return out


def run_sweep(quick: bool, logs: Path, progress: Callable[[str], None], keep: list[dict]) -> dict:
    """Open loop at rising offered load, 50 tokens in a burst: throughput and p99 per target."""
    rates = (100.0, 300.0) if quick else SWEEP_RATES
    d, w = (0.6, 0.3) if quick else (4.0, 1.0)
    base = Case(name="sweep", title="open loop sweep, 50 tokens burst", targets=SWEEP_TARGETS, duration_s=d,
                warmup_s=w, rounds=1)
    server_cpu, other_cpu = cpu_plan()
    procs = Processes(logs, server_cpu, other_cpu, progress)
    points: dict[str, list[dict]] = {t: [] for t in SWEEP_TARGETS}
    try:
        urls = start_case(base, procs)
        pids = {name: p.pid for name, p in procs.procs.items()}
        for rate in rates:
            for target in SWEEP_TARGETS:
                progress(f"sweep: {rate:g} tasks/s, {target}")
                result = run_client(client_spec(base, target, urls, pids, round_no=0, rate=rate), other_cpu,
                                    timeout_s=w + d + 180)
                s = summarise(result)
                points[target].append({"offered": rate, **s})
    finally:
        procs.stop()
    return {"rates": list(rates), "points": points}


def bench_load(out: Path, *, quick: bool = False, only: tuple[str, ...] = (), sweep: bool = True,
               progress: Callable[[str], None] = print, before: Path | None = None) -> dict:
    """Run every case (or ``only`` those), write ``load.json``, ``load.md`` and the plots to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    server_cpu, _ = cpu_plan()
    results: dict = {"quick": quick, "cpus": len(os.sched_getaffinity(0)), "pinned": bool(server_cpu),
                     "python": sys.version.split()[0], "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cases": {}}
    records: list[dict] = []
    for case in cases(quick, before):
        if only and case.name not in only:
            continue
        started = time.monotonic()
        results["cases"][case.name] = run_case(case, logs, progress, records)
        progress(f"{case.name}: done in {time.monotonic() - started:.0f} s")
    if sweep and (not only or "sweep" in only):
        results["sweep"] = run_sweep(quick, logs, progress, records)
    (out / "load.json").write_bytes(json.dumps(results, indent=1).encode())
    (out / "load.md").write_text(table(results))
    plots(results, records, out)
    return results


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="out/bench-load", help="directory for load.json, load.md, the PNGs and logs/")
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke of every case (seconds, one round); the figures mean little")
    parser.add_argument("--only", default="", help="comma-separated case names: " +
                        ", ".join([c.name for c in cases(False)] + ["sweep"]))
    parser.add_argument("--no-sweep", action="store_true", help="skip the offered-load sweep")
    parser.add_argument("--before", metavar="TREE", default=None,
                        help="another checkout (extensions built in place) whose orchestratord the tracing case "
                             "runs beside this one's, e.g. `git worktree add TREE <commit>`: the cost of tracing "
                             "when it is off")


def run_from_args(args) -> int:
    only = tuple(n for n in args.only.split(",") if n)
    known = {c.name for c in cases(False)} | {"sweep"}
    unknown = [n for n in only if n not in known]
    if unknown:
        print(f"bench load: unknown case {', '.join(unknown)} (known: {', '.join(sorted(known))})", file=sys.stderr)
        return 2
    out = Path(args.out)
    started = time.monotonic()
    before = Path(args.before).expanduser().resolve() if args.before else None
    if before is not None and not (before / "llama_orch" / "io" / "orchestratord").is_dir():
        print(f"bench load: --before {args.before}: not a llama-orch checkout", file=sys.stderr)
        return 2
    results = bench_load(out, quick=args.quick, only=only, sweep=not args.no_sweep, before=before,
                         progress=lambda line: print(f"[{time.monotonic() - started:6.1f} s] {line}", flush=True))
    print(table(results))
    print(f"written: {out / 'load.json'}, {out / 'load.md'}, {out / 'load_latency_cdf.png'}"
          + (f", {out / 'load_vs_offered.png'}" if "sweep" in results else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="llama-orch bench load", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
