"""``llama-orch``: the command line.

Subcommands so far: ``replay`` (the simulator over a recorded trace), ``make-tiny-model``,
``build-engine``. Bad input or
configuration ends the command with one line naming what was wrong and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .core.errors import UsageError

SHIPPED_TRACES = {
    "conv": "azure2023_conv.csv",
    "code": "azure2023_code.csv",
}


def _fail(message: str) -> int:
    print(f"llama-orch: error: {message}", file=sys.stderr)
    return 2


class _Parser(argparse.ArgumentParser):
    """An argument error is one line naming what was wrong (the usage is one --help away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _resolve_trace(name: str) -> Path:
    path = Path(name)
    if path.exists() or name not in SHIPPED_TRACES:
        return path
    here = Path(__file__).resolve().parent.parent / "bench" / "traces" / SHIPPED_TRACES[name]
    return here


def _replay(args: argparse.Namespace) -> int:
    from .sim.report import format_table, summarise, write_report
    from .sim.simulator import SimConfig, Simulation
    from .sim.traces import TraceError, read_trace, scale_trace

    trace_path = _resolve_trace(args.trace)
    try:
        records = scale_trace(read_trace(trace_path), rate=args.rate, length=args.length, limit=args.limit)
    except (TraceError, ValueError) as exc:
        return _fail(str(exc))
    try:
        config = SimConfig(
            pools=args.pools, slots_per_pool=args.slots, tokens_per_s=args.tokens_per_s,
            prefill_ms_per_token=args.prefill_ms_per_token, batch_fraction=args.batch_fraction,
            deadline_ms=args.deadline_ms, admission_capacity=args.capacity, admission_policy=args.policy,
            placement_strategy=args.strategy, pool_losses=args.pool_losses, slow_engines=args.slow_engines)
    except UsageError as exc:
        return _fail(str(exc))

    started = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] > 0.5:
            last[0] = now
            print(f"\rreplay: {done}/{total} tasks ({100 * done // total}%) {now - started:.1f} s",
                  end="" if done < total else "\n", file=sys.stderr, flush=True)

    sim = Simulation(records, config=config, seed=args.seed, trace_name=trace_path.name,
                     progress=progress if not args.quiet else None)
    result = sim.run()
    elapsed = time.perf_counter() - started
    paths = write_report(result, args.out)
    print(format_table(summarise(result)))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    print(f"simulated {len(records)} tasks in {elapsed:.2f} s wall clock "
          f"({len(records) / elapsed:,.0f} tasks/s)", file=sys.stderr)
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from .tiny_model import write_tiny_model

    path = write_tiny_model(args.out)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


def _build_engine(args: argparse.Namespace) -> int:
    import asyncio

    from .io.engine_build import BuildError, default_spec, ensure_llama_server

    try:
        path = asyncio.run(ensure_llama_server(Path(args.cache_dir).expanduser(), default_spec(args.gpu_mask)))
    except BuildError as exc:
        return _fail(str(exc))
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llama-orch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="replay a recorded trace through the core with simulated engines")
    rp.add_argument("trace", help="CSV (TIMESTAMP,ContextTokens,GeneratedTokens) or JSONL trace; "
                                  f"or one of the shipped names {sorted(SHIPPED_TRACES)}")
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--out", default="out/replay", help="directory for report.txt, summary.json, tasks.csv, replay.png")
    rp.add_argument("--rate", type=_positive_float, default=1.0, help="arrival-rate multiplier")
    rp.add_argument("--length", type=_positive_float, default=1.0, help="token-count multiplier")
    rp.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    rp.add_argument("--pools", type=int, default=8)
    rp.add_argument("--slots", type=int, default=4, help="slots per pool")
    rp.add_argument("--tokens-per-s", type=_positive_float, default=50.0, help="decode rate of one slot")
    rp.add_argument("--prefill-ms-per-token", type=float, default=0.05)
    rp.add_argument("--batch-fraction", type=float, default=0.3)
    rp.add_argument("--deadline-ms", type=int, default=300_000)
    rp.add_argument("--capacity", type=int, default=256, help="admission queue capacity")
    rp.add_argument("--policy", default="reject", help="full-queue policy: reject | drop-lru")
    rp.add_argument("--strategy", default="vram-aware",
                    help="placement: vram-aware | least-loaded | round-robin | random")
    rp.add_argument("--pool-losses", type=int, default=1, help="seeded pool-loss faults")
    rp.add_argument("--slow-engines", type=int, default=1, help="seeded slow-engine windows")
    rp.add_argument("--quiet", action="store_true", help="no progress line")
    rp.set_defaults(func=_replay)

    tm = sub.add_parser("make-tiny-model", help="write the small llama GGUF used by the tests and the demo")
    tm.add_argument("out", help="output path, e.g. tiny.gguf")
    tm.set_defaults(func=_make_tiny_model)

    be = sub.add_parser("build-engine", help="build llama-server from source into the cache (once), print its path")
    be.add_argument("--cache-dir", default=os.environ.get("ENGINE_PROVISIONER_CACHE_DIR", "~/.cache/llama-orch"))
    be.add_argument("--gpu-mask", default=os.environ.get("ENGINE_PROVISIONER_GPU_MASK", ""),
                    help="non-empty with nvcc on PATH: a CUDA build")
    be.set_defaults(func=_build_engine)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
