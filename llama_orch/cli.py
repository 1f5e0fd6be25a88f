"""``llama-orch``: the command line.

Subcommands: ``up`` (the whole cluster on this machine, ``io.local_cluster``), ``submit`` (one
task, its tokens streamed to the terminal), ``status`` (the pools as a table), ``replay`` (the
simulator over a recorded trace), ``bench load`` and ``bench fidelity``, ``make-tiny-model``,
``build-engine``. Bad input or configuration ends the command with one line naming what was
wrong and exit status 2; a failure at run time (a daemon that died, an unreachable orchestratord, a rejected or failed
task) with exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import shlex
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .core.errors import UsageError

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_SAMPLE = "Once upon a time"

SHIPPED_TRACES = {
    "conv": "azure2023_conv.csv",
    "code": "azure2023_code.csv",
    "mooncake": "mooncake_synthetic.jsonl",
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
    from .sim.simulator import SimConfig, Simulation, cli_flags
    from .sim.traces import TraceError, read_trace, scale_trace

    trace_path = _resolve_trace(args.trace)
    try:
        records = scale_trace(read_trace(trace_path), rate=args.rate, length=args.length, limit=args.limit)
    except (TraceError, ValueError) as exc:
        return _fail(str(exc))
    try:
        config = SimConfig(**{name: getattr(args, name) for _, name, _, _, _ in cli_flags()})
        capacities = _capacities(args.capacities)
    except UsageError as exc:
        return _fail(str(exc))
    if args.compare_strategies:
        from .sim.compare import compare_strategies, format_comparison, write_comparison

        started = time.perf_counter()
        comparison = compare_strategies(
            records, config, seed=args.seed, trace_name=trace_path.name, capacities=capacities,
            progress=(lambda line: None) if args.quiet else
            (lambda line: print(f"[{time.perf_counter() - started:6.1f} s] {line}", file=sys.stderr, flush=True)))
        comparison["rerun"] = replay_command(args.trace, config, seed=args.seed, rate=args.rate, length=args.length,
                                             limit=args.limit) + " --compare-strategies" + (
            f" --capacities={args.capacities}" if args.capacities else "")
        paths = write_comparison(comparison, Path(args.out))
        print(format_comparison(comparison))
        print(f"wrote {', '.join(str(p) for p in paths)}")
        return 0
    if capacities:
        return _fail("--capacities goes with --compare-strategies")

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
    result = dataclasses.replace(sim.run(), rerun=replay_command(args.trace, config, seed=args.seed, rate=args.rate,
                                                                 length=args.length, limit=args.limit))
    elapsed = time.perf_counter() - started
    paths = write_report(result, args.out)
    print(format_table(summarise(result)))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    print(f"simulated {len(records)} tasks in {elapsed:.2f} s wall clock "
          f"({len(records) / elapsed:,.0f} tasks/s)", file=sys.stderr)
    return 0


def _capacities(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--capacities: expected comma-separated block counts (0: unbounded), got {text!r}") from None
    if any(v < 0 for v in values):
        raise UsageError(f"--capacities: block counts must be >= 0, got {text!r}")
    return values


def replay_command(trace: str, config, *, seed: int, rate: float, length: float, limit: int | None) -> str:
    """The ``llama-orch replay`` command line that runs this replay again (settings at their
    defaults left out)."""
    from .sim.simulator import config_flags

    parts = ["llama-orch replay", shlex.quote(trace), f"--seed={seed}", f"--rate={rate:g}", f"--length={length:g}"]
    if limit is not None:
        parts.append(f"--limit={limit}")
    return " ".join(parts + [shlex.quote(flag) for flag in config_flags(config)])


def _make_tiny_model(args: argparse.Namespace) -> int:
    from .io.provisioner.tiny_model import write_tiny_model

    try:
        path = write_tiny_model(args.out, layers=args.layers, embd=args.embd)
    except ValueError as exc:
        return _fail(str(exc))
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


def _build_engine(args: argparse.Namespace) -> int:
    import asyncio

    from .io.provisioner.engine_build import BuildError, default_spec, ensure_llama_server

    try:
        path = asyncio.run(ensure_llama_server(Path(args.cache_dir).expanduser(), default_spec(args.gpu_mask)))
    except BuildError as exc:
        return _fail(str(exc))
    print(path)
    return 0


# -- the client side: submit and status ------------------------------------------------------------


class _ClientError(Exception):
    """Orchestratord unreachable, or it could not run the task: one message, exit status 1."""


@dataclass(slots=True)
class TaskResult:
    ok: bool
    tokens: int = 0
    pool_id: str | None = None
    queued_ms: int | None = None
    first_token_ms: float | None = None
    total_ms: float = 0.0
    end: dict | None = None
    error: dict | None = None

    def summary(self) -> str:
        """The one stats line after a stream: what an operator checks first, greppable."""
        parts = [f"tokens_out={self.end.get('tokens_out', self.tokens) if self.end else self.tokens}",
                 f"pool={self.pool_id or '-'}"]
        if self.queued_ms is not None:
            parts.append(f"queued_ms={self.queued_ms}")
        if self.first_token_ms is not None:
            parts.append(f"first_token_ms={self.first_token_ms:.0f}")
        decode_ms = (self.end or {}).get("decode_ms")
        if isinstance(decode_ms, (int, float)):
            parts.append(f"decode_ms={decode_ms:.0f}")
            if decode_ms > 0 and self.tokens:
                parts.append(f"tokens_per_s={1000 * self.tokens / decode_ms:.0f}")
        parts.append(f"total_ms={self.total_ms:.0f}")
        if self.end and self.end.get("canceled"):
            parts.append("canceled")
        return " ".join(parts)


def _session(total: float | None = 10.0):
    """The client's HTTP session; ``LLAMA_ORCH_API_KEY`` (when set) goes on every request.
    ``LLAMA_ORCH_CA`` is the CA to trust for an https orchestratord (default: the system's), and
    ``LLAMA_ORCH_CERT`` with ``LLAMA_ORCH_KEY`` a client certificate to present."""
    import ssl

    import aiohttp

    key = os.environ.get("LLAMA_ORCH_API_KEY")
    context: ssl.SSLContext | bool = True
    ca, cert, cert_key = (os.environ.get(f"LLAMA_ORCH_{name}") for name in ("CA", "CERT", "KEY"))
    if ca or cert:
        context = ssl.create_default_context(cafile=ca or None)
        if cert:
            context.load_cert_chain(cert, cert_key or None)
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=total, sock_connect=5),
                                 headers={"Authorization": f"Bearer {key}"} if key else None,
                                 connector=aiohttp.TCPConnector(ssl=context))


async def _get_pools(http, url: str) -> list[dict]:
    import aiohttp
    import orjson

    try:
        async with http.get(f"{url}/v2/pools") as resp:
            body = await resp.read()
            if resp.status != 200:
                raise _ClientError(f"GET {url}/v2/pools answered HTTP {resp.status}: {body[:200].decode(errors='replace')}")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise _ClientError(f"cannot reach orchestratord at {url} ({type(exc).__name__}: {exc}); "
                           "is `llama-orch up` running, or is --url wrong?") from None
    try:
        pools = orjson.loads(body).get("pools")
    except (orjson.JSONDecodeError, AttributeError):
        pools = None
    if not isinstance(pools, list):
        raise _ClientError(f"GET {url}/v2/pools: not a pool list (is {url} an orchestratord?)")
    return pools


def _task_body(prompt: str, *, model_ref: str, engine: str, max_tokens: int, priority: str, ctx: int | None,
               deadline_ms: int, pin: str | None, seed: int | None, session_id: str | None) -> dict:
    body = {"task_id": str(uuid.uuid4()), "session_id": session_id or str(uuid.uuid4()), "workload": "completion",
            "model_ref": model_ref, "engine": engine, "priority": priority, "max_tokens": max_tokens,
            "deadline_ms": deadline_ms, "prompt": prompt,
            # enough context for the prompt (about 4 bytes a token) and the answer
            "ctx": ctx if ctx is not None else max(256, len(prompt.encode()) // 4 + max_tokens + 16)}
    if pin:
        body["placement"] = {"mode": "pin", "pin_pool_id": pin}
    if seed is not None:
        body["seed"] = seed
    return body


async def run_task(url: str, prompt: str, *, max_tokens: int = 64, model: str | None = None,
                   priority: str = "interactive", ctx: int | None = None, deadline_ms: int = 120_000,
                   pin: str | None = None, seed: int | None = None, session_id: str | None = None,
                   out: TextIO = sys.stdout) -> TaskResult:
    """Submit one completion and write its tokens to ``out`` as they arrive.

    The model and engine default to those of the first ready pool (the pinned one with ``pin``).
    A refused submission raises ``_ClientError`` with the envelope's code and message; an
    ``error`` event in the stream gives a result with ``ok=False``. Interrupted (Ctrl-C), the
    task is canceled on the server before the interruption goes on."""
    import aiohttp
    import orjson

    from .ext.sse import SSEParser

    url = url.rstrip("/")
    async with _session(total=None) as http:
        engine = "llamacpp"
        if model is None:
            pools = await _get_pools(http, url)
            ready = sorted((p for p in pools if p.get("ready") and (pin is None or p.get("pool_id") == pin)),
                           key=lambda p: str(p.get("pool_id")))
            if pin is not None and pin not in {p.get("pool_id") for p in pools}:
                known = ", ".join(sorted(str(p.get("pool_id")) for p in pools)) or "none"
                raise _ClientError(f"no pool named {pin} at {url} (pools: {known})")
            if not ready:
                which = f"pool {pin} is not ready" if pin else "no pool is ready"
                raise _ClientError(f"{which} at {url} (`llama-orch status --url {url}` shows why); "
                                   "or name the model with --model")
            model, engine = ready[0]["model_ref"], ready[0].get("engine") or engine
        body = _task_body(prompt, model_ref=model, engine=engine, max_tokens=max_tokens, priority=priority, ctx=ctx,
                          deadline_ms=deadline_ms, pin=pin, seed=seed, session_id=session_id)
        started = time.monotonic()
        try:
            async with http.post(f"{url}/v2/tasks", json=body) as resp:
                raw = await resp.read()
                if resp.status != 202:
                    try:
                        envelope = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        envelope = {"code": f"HTTP {resp.status}", "message": raw[:200].decode(errors="replace")}
                    retry = f" (retry after {envelope['retry_after_ms']} ms)" if envelope.get("retry_after_ms") else ""
                    raise _ClientError(f"task refused with HTTP {resp.status}: {envelope.get('code')}: "
                                       f"{envelope.get('message')}{retry}")
                admission = orjson.loads(raw)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise _ClientError(f"cannot reach orchestratord at {url} ({type(exc).__name__}: {exc})") from None

        result = TaskResult(ok=False)
        parser = SSEParser()
        ended_with_newline = True
        stream_url = url + ((admission.get("streams") or {}).get("sse") or f"/v2/tasks/{body['task_id']}/events")
        try:
            async with http.get(stream_url) as resp:
                if resp.status != 200:
                    raise _ClientError(f"GET {stream_url} answered HTTP {resp.status}")
                async for chunk in resp.content.iter_any():
                    for kind, data in parser.feed(chunk):
                        event = orjson.loads(data)
                        if kind == "token":
                            if result.first_token_ms is None:
                                result.first_token_ms = (time.monotonic() - started) * 1000
                            text = str(event.get("t", ""))
                            out.write(text)
                            out.flush()  # each token as it comes: this is the point of streaming
                            result.tokens += 1
                            if text:
                                ended_with_newline = text.endswith("\n")
                        elif kind == "started":
                            result.pool_id = event.get("pool_id")
                            result.queued_ms = event.get("queued_ms")
                        elif kind == "end":
                            result.ok, result.end = True, event
                        elif kind == "error":
                            result.error = event
        except asyncio.CancelledError:  # Ctrl-C: free the slot now rather than when the stream notices
            try:
                async with http.post(f"{url}/v2/tasks/{body['task_id']}/cancel", timeout=aiohttp.ClientTimeout(total=2)):
                    pass
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            result.error = {"code": "STREAM_LOST", "message": f"{type(exc).__name__}: {exc}"}
        if not ended_with_newline:
            out.write("\n")
            out.flush()
        result.total_ms = (time.monotonic() - started) * 1000
        if result.end is None and result.error is None:
            result.error = {"code": "STREAM_LOST", "message": "the stream ended without an end or error event"}
        return result


def _report_result(result: TaskResult) -> int:
    print(result.summary(), file=sys.stderr, flush=True)
    if result.error is not None:
        err = result.error
        print(f"llama-orch: task failed: {err.get('code')}: {err.get('message')}", file=sys.stderr, flush=True)
        return 1
    return 0


def _submit(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        return _fail(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.deadline_ms < 1:
        return _fail(f"--deadline-ms must be >= 1, got {args.deadline_ms}")
    if args.ctx is not None and args.ctx < 1:
        return _fail(f"--ctx must be >= 1, got {args.ctx}")
    try:
        result = asyncio.run(run_task(args.url, args.prompt, max_tokens=args.max_tokens, model=args.model,
                                      priority=args.priority, ctx=args.ctx, deadline_ms=args.deadline_ms,
                                      pin=args.pin, seed=args.seed, session_id=args.session))
    except _ClientError as exc:
        print(f"llama-orch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nllama-orch: interrupted; the task was canceled", file=sys.stderr)
        return 130
    return _report_result(result)


def _human_bytes(value: object) -> str:
    if not isinstance(value, (int, float)) or value < 0:
        return "?"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def format_pools(pools: list[dict]) -> str:
    """The pools as an aligned table, one row each, then each pool's last error on its own line."""
    header = ("POOL", "READY", "SLOTS FREE", "VRAM FREE", "ENGINE", "MODEL")
    rows = []
    for p in sorted(pools, key=lambda p: str(p.get("pool_id"))):
        total = p.get("slots_total") or 0
        free = p.get("slots_free", max(0, total - (p.get("leases") or 0))) if p.get("ready") else 0  # takes no work
        rows.append((str(p.get("pool_id")), "yes" if p.get("ready") else "no", f"{free}/{total}",
                     f"{_human_bytes(p.get('vram_free_bytes'))} / {_human_bytes(p.get('vram_total_bytes'))}",
                     " ".join(str(x) for x in (p.get("engine"), p.get("engine_version")) if x) or "?",
                     str(p.get("model_ref") or "?")))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (header, *rows)]
    lines += [f"{p.get('pool_id')}: last error: {p['last_error']}" for p in sorted(pools, key=lambda p: str(p.get("pool_id")))
              if p.get("last_error")]
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    import orjson

    async def fetch() -> list[dict]:
        async with _session() as http:
            return await _get_pools(http, args.url.rstrip("/"))

    try:
        pools = asyncio.run(fetch())
    except _ClientError as exc:
        print(f"llama-orch: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps({"pools": pools}, option=orjson.OPT_INDENT_2).decode())
    elif not pools:
        print(f"no pools known to orchestratord at {args.url} yet")
    else:
        print(format_pools(pools))
    return 0


# -- up: the cluster on this machine ------------------------------------------------------------------


def _note(line: str) -> None:
    print(f"llama-orch up: {line}", file=sys.stderr, flush=True)


def _short(path: Path) -> str:
    """A path as the operator typed it: relative to the working directory when under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _banner(cluster, elapsed_s: float) -> str:
    lines = [f"llama-orch is up: {len(cluster.pools)} pool{'s' if len(cluster.pools) != 1 else ''} ready "
             f"in {elapsed_s:.1f} s"]
    width = max(len(c.name) for c in cluster.children)
    for child in reversed(cluster.children):  # front to back, as a request travels
        lines.append(f"  {child.name.ljust(width)}  {child.url}  pid {child.pid}  log {_short(child.log_path)}")
    for pool in cluster.pools:
        engine = " ".join(str(x) for x in (pool.get("engine"), pool.get("engine_version")) if x)
        lines.append(f"  {str(pool.get('pool_id')).ljust(width)}  {pool.get('engine_url')}  pid {pool.get('engine_pid')}"
                     f"  {engine}, {pool.get('slots_total')} slots, {pool.get('model_ref')}")
    url = cluster.orchestratord_url
    flag = "" if url == DEFAULT_URL else f" --url {url}"
    prog = _invoked_as()
    lines.append("try, in another terminal while this one serves:")
    if cluster.certs:
        lines.append(f"      export LLAMA_ORCH_CA={cluster.certs['client'].ca}")
    lines.append(f'      {prog} submit "Why is the sky blue?"{flag}')
    lines.append(f"      {prog} status{flag}")
    return "\n".join(lines)


def _invoked_as() -> str:
    """How to run this command again from here: ``.venv/bin/llama-orch`` after ``make run``, whose
    virtualenv is not on PATH; plain ``llama-orch`` when that is the same program."""
    import shutil

    script = Path(sys.argv[0])
    if script.name != "llama-orch":
        return "llama-orch"
    on_path = shutil.which("llama-orch")
    if on_path and Path(on_path).resolve() == script.resolve():
        return "llama-orch"
    return _short(script.resolve()) if script.is_absolute() else str(script)


async def _run_cluster(cluster, args: argparse.Namespace) -> int:
    started = time.monotonic()
    await cluster.prepare()
    cluster.start()
    await cluster.wait_ready()
    print(_banner(cluster, time.monotonic() - started), flush=True)
    if cluster.certs:  # the sample below, like the commands the banner shows, trusts the cluster's CA
        os.environ["LLAMA_ORCH_CA"] = str(cluster.certs["client"].ca)
    code = 0
    if args.sample is not None or args.once:
        prompt = args.sample or DEFAULT_SAMPLE
        print(f"--- sample task ({args.sample_tokens} tokens): {prompt}", flush=True)
        try:
            code = _report_result(await run_task(cluster.orchestratord_url, prompt, max_tokens=args.sample_tokens))
        except _ClientError as exc:
            print(f"llama-orch: sample task: {exc}", file=sys.stderr, flush=True)
            code = 1
    if args.once:
        return code
    print("llama-orch is running; Ctrl-C stops everything.", flush=True)
    await cluster.watch()  # returns only by raising: a daemon that keeps dying
    return 1


def _certs(args: argparse.Namespace) -> int:
    from .io.certs import ENV_PREFIXES, SERVICES, make_dev_certs

    if args.days < 1:
        return _fail(f"--days must be >= 1, got {args.days}")
    services = tuple(dict.fromkeys(args.service)) or SERVICES
    bad = [s for s in services if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", s)]
    if bad:
        return _fail(f"--service {bad[0]!r}: expected a name of letters, digits, '.', '_' or '-'")
    directory = Path(args.dir).expanduser()
    try:
        made = make_dev_certs(directory, services=services, hosts=tuple(args.host), days=args.days)
    except (OSError, ValueError) as exc:
        return _fail(f"cannot write certificates to {directory}: {exc}")
    print(f"CA: {directory / 'ca.pem'} (key {directory / 'ca-key.pem'}: keep it off the servers)")
    for name, cert in made.items():
        prefix = ENV_PREFIXES.get(name)
        print(f"{name}:")
        if prefix is not None:
            print("  " + " ".join(f"{k}={v}" for k, v in cert.env(prefix).items()))
        else:
            print(f"  cert {cert.cert}, key {cert.key}, CA {cert.ca}")
    return 0


def _up(args: argparse.Namespace) -> int:
    from .io.local_cluster import ClusterConfig

    if args.sample_tokens < 1:
        return _fail(f"--sample-tokens must be >= 1, got {args.sample_tokens}")
    try:
        config = ClusterConfig(pools=args.pools, engine=args.engine, model=args.model, slots=args.slots, ctx=args.ctx,
                               port=args.port, pool_managerd_port=args.pool_managerd_port,
                               provisioner_port=args.provisioner_port, state_dir=Path(args.state_dir),
                               cache_dir=Path(args.cache_dir).expanduser(), ready_timeout_s=args.ready_timeout_s,
                               tls=args.tls)
    except UsageError as exc:
        return _fail(str(exc))
    return asyncio.run(_up_async(config, args))


async def _up_async(config, args: argparse.Namespace) -> int:
    import signal

    from .io.local_cluster import ClusterError, LocalCluster

    loop = asyncio.get_running_loop()
    cluster = LocalCluster(config, report=_note)
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            cluster.hurry()
            _note("killing what is left")
        else:
            _note(f"{sig.name}: stopping (again to kill at once)")
            stop.set()

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal went away
    for sig in handled:
        loop.add_signal_handler(sig, on_signal, sig)
    life = asyncio.ensure_future(_run_cluster(cluster, args))
    stopper = asyncio.ensure_future(stop.wait())
    code = 0
    try:
        await asyncio.wait({life, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if life.done():
            code = life.result()
        else:  # asked to stop: whatever the cluster was doing is moot now
            life.cancel()
            await asyncio.gather(life, return_exceptions=True)
            code = 0 if cluster.pools else 130  # stopping a running cluster is its normal end; not so a start
    except UsageError as exc:
        code = _fail(str(exc))
    except ClusterError as exc:
        print(f"llama-orch up: error: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        stopper.cancel()
        stop.set()  # from here on a signal means: do not wait for graceful exits
        warnings = await cluster.stop()
        for warning in warnings:
            _note(f"warning: {warning}")
        if warnings and code == 0:
            code = 1
        if cluster.children:
            _note("stopped" + (" (with warnings)" if warnings else "; nothing left running"))
        for sig in handled:
            loop.remove_signal_handler(sig)
    return code


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per simulation setting (``SimConfig``), defaults and help from there."""
    from .sim.simulator import cli_flags

    for flag, name, kind, default, help_text in cli_flags():
        parser.add_argument(flag, dest=name, type=kind, default=default, help=f"{help_text} (default {default})")


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
    add_sim_arguments(rp)
    rp.add_argument("--compare-strategies", action="store_true",
                    help="the trace through every placement strategy: strategies.md, .json and .png in --out")
    rp.add_argument("--capacities", default=None,
                    help="with --compare-strategies: KV cache sizes per pool to compare, blocks (0: unbounded), "
                         "e.g. 256,1024,0")
    rp.add_argument("--quiet", action="store_true", help="no progress line")
    rp.set_defaults(func=_replay)

    tm = sub.add_parser("make-tiny-model", help="write the small llama GGUF used by the tests and the demo")
    tm.add_argument("out", help="output path, e.g. tiny.gguf")
    tm.add_argument("--layers", type=int, default=2, help="default 2 (the tiny model); more is slower per token")
    tm.add_argument("--embd", type=int, default=64, help="embedding width, a multiple of 4 (default 64)")
    tm.set_defaults(func=_make_tiny_model)

    be = sub.add_parser("build-engine", help="build llama-server from source into the cache (once), print its path")
    be.add_argument("--cache-dir", default=os.environ.get("ENGINE_PROVISIONER_CACHE_DIR", "~/.cache/llama-orch"))
    be.add_argument("--gpu-mask", default=os.environ.get("ENGINE_PROVISIONER_GPU_MASK", ""),
                    help="non-empty with nvcc on PATH: a CUDA build")
    be.set_defaults(func=_build_engine)

    up = sub.add_parser("up", help="the whole cluster on this machine: provisioner, pool-managerd, orchestratord",
                        description="Start engine-provisioner (N pools), pool-managerd and orchestratord as child "
                                    "processes, wait until every pool is ready, print the URLs; Ctrl-C stops all.")
    up.add_argument("--pools", type=int, default=1, help="number of pools, pool-0 .. pool-{N-1} (default 1)")
    up.add_argument("--engine", choices=("llama-server", "mock"), default="llama-server",
                    help="llama-server: the real engine, built from source into the cache once (default); "
                         "mock: the project's mock engine")
    up.add_argument("--model", default=None, help="file:/path.gguf, a path, https://... or hf:org/repo/file.gguf "
                                                  "(default: the tiny model)")
    up.add_argument("--slots", type=int, default=2, help="slots per pool (default 2)")
    up.add_argument("--ctx", type=int, default=2048, help="context tokens per slot (default 2048)")
    up.add_argument("--port", type=int, default=8080, help="orchestratord's port (default 8080; 0 picks a free one)")
    up.add_argument("--pool-managerd-port", type=int, default=9200, help="default 9200; 0 picks a free one")
    up.add_argument("--provisioner-port", type=int, default=9300,
                    help="the provisioner's control API (default 9300; 0 picks a free one)")
    up.add_argument("--state-dir", default=".runtime", help="handoff files, pools.json and logs/ (default .runtime)")
    up.add_argument("--cache-dir", default=os.environ.get("ENGINE_PROVISIONER_CACHE_DIR", "~/.cache/llama-orch"),
                    help="engines and models (default ~/.cache/llama-orch)")
    up.add_argument("--ready-timeout-s", type=_positive_float, default=120.0,
                    help="how long the pools may take to become ready, after any build (default 120)")
    up.add_argument("--sample", metavar="PROMPT", default=None,
                    help="once ready, run one task with this prompt and stream its tokens")
    up.add_argument("--sample-tokens", type=int, default=32, help="max_tokens of the sample task (default 32)")
    up.add_argument("--once", action="store_true",
                    help=f"run the sample task (default prompt {DEFAULT_SAMPLE!r}), then stop everything and exit "
                         "(0 when the sample streamed to its end)")
    up.add_argument("--tls", action="store_true",
                    help="mTLS between the daemons and https for clients, with a development CA and certificates "
                         "made in <state-dir>/certs (llama-orch certs)")
    up.set_defaults(func=_up)

    ce = sub.add_parser("certs", help="make a development CA and a certificate for each daemon (mTLS)",
                        description="Writes ca.pem/ca-key.pem (reused when DIR has them) and <service>.pem/"
                                    "<service>-key.pem for each service, usable as server and client certificates, "
                                    "then prints the environment variables that point each daemon at its files. "
                                    "For development and tests: production certificates come from your own CA.")
    ce.add_argument("dir", help="where to write the files (created; keys are mode 0600)")
    ce.add_argument("--host", action="append", default=[],
                    help="a host name or address the certificates are valid for, besides loopback (repeatable)")
    ce.add_argument("--service", action="append", default=[],
                    help="issue for these services only (repeatable; default: orchestratord, pool-managerd, "
                         "engine-provisioner and client, for operators' tools and scrapers)")
    ce.add_argument("--days", type=int, default=90, help="validity of the service certificates (default 90)")
    ce.set_defaults(func=_certs)

    url_default = os.environ.get("LLAMA_ORCH_URL", DEFAULT_URL)
    url_help = f"orchestratord's base URL (env LLAMA_ORCH_URL, default {DEFAULT_URL})"
    sb = sub.add_parser("submit", help="run one completion task and stream its tokens to the terminal")
    sb.add_argument("prompt")
    sb.add_argument("--url", default=url_default, help=url_help)
    sb.add_argument("--max-tokens", type=int, default=64, help="default 64")
    sb.add_argument("--model", default=None, help="model_ref (default: that of the first ready pool)")
    sb.add_argument("--priority", choices=("interactive", "batch"), default="interactive")
    sb.add_argument("--pin", metavar="POOL", default=None, help="run on this pool only (placement mode pin)")
    sb.add_argument("--ctx", type=int, default=None, help="context tokens needed (default: prompt + max tokens)")
    sb.add_argument("--deadline-ms", type=int, default=120_000, help="default 120000")
    sb.add_argument("--seed", type=int, default=None)
    sb.add_argument("--session", default=None, help="session_id (a UUID) to continue a session; default a new one")
    sb.set_defaults(func=_submit)

    st = sub.add_parser("status", help="the pools known to orchestratord, as a table")
    st.add_argument("--url", default=url_default, help=url_help)
    st.add_argument("--json", action="store_true", help="the raw GET /v2/pools answer instead of the table")
    st.set_defaults(func=_status)

    from .io.lab.commands import add_parser as add_lab_parser

    add_lab_parser(sub)

    bn = sub.add_parser("bench", help="measure orchestratord against its baselines")
    bench_sub = bn.add_subparsers(dest="bench_command", required=True)
    bl = bench_sub.add_parser("load", help="orchestratord beside a minimal relay, a two-step relay and bare aiohttp, "
                                           "on fast fake engines, closed and open loop; tables, JSON and plots",
                              description="Starts fast engines, orchestratord and the baselines as processes (the "
                                          "server under test pinned to one CPU), runs every case in interleaved "
                                          "rounds and reports medians, ranges and ratios against the targets.")
    from .io.bench.load import add_arguments as bench_load_arguments

    bench_load_arguments(bl)
    bl.set_defaults(func=_bench_load)
    bf = bench_sub.add_parser("fidelity", help="a trace slice live through a local cluster and in the simulator, "
                                               "calibrated from the live engines; live against simulated",
                              description="Brings up a cluster on this machine, calibrates the simulated engine from "
                                          "its engines, drives a trace slice live at several utilisation levels, "
                                          "replays the same slices in the simulator and compares queue wait, time "
                                          "to first token and total time (p50/p90/p99) and rejections.")
    from .fidelity import add_arguments as fidelity_arguments

    fidelity_arguments(bf)
    bf.set_defaults(func=_bench_fidelity)
    return parser


def _bench_fidelity(args: argparse.Namespace) -> int:
    from .fidelity import run_from_args

    return run_from_args(args, _resolve_trace(args.trace))


def _bench_load(args: argparse.Namespace) -> int:
    from .io.bench.load import run_from_args

    return run_from_args(args)


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
