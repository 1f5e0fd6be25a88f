"""The load generator of ``llama-orch bench load``: one process that sends tasks and times them.

It runs in its own process (pinned away from the server under test) and is told one run as
JSON: where to send, in which shape, with which arrivals, for how long. Shapes:

- ``v2``: ``POST /v2/tasks`` (admission: the 202), then ``GET /v2/tasks/{id}/events`` read to its end;
- ``v1``: ``POST /v1/completions`` with ``stream: true`` (admission: the response headers), read to its end;
- ``admit``: ``POST /v2/tasks`` only (the tasks stay queued or run unread).

Arrivals are closed-loop (``concurrency`` tasks in flight, the next sent as one ends) or
open-loop (``rate`` per second, ``constant`` or ``poisson`` gaps, or a list of ``arrivals``
in seconds from a trace). Every time is measured from the task's scheduled send time, not
from when the client got round to sending it, so a server that falls behind is charged for
the wait (no coordinated omission). A task's first token is the first read carrying the
shape's token marker; its outcome is ``ok`` only with a 2xx status, the shape's end marker
and no error marker. Tasks still open when the run's time is up are counted ``unfinished``.

The result is JSON in a file: per-task timings as parallel lists (milliseconds from the
run's start), so the parent computes percentiles and plots CDFs.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
import orjson

from .process import run as run_loop

#: What marks a token, the end, and an error in each stream dialect a target answers in.
DIALECTS = {
    "orchd-sse": (b"event: token", b"event: end", b"event: error"),  # orchestratord's v2 events
    "openai": (b'"text"', b"data: [DONE]", b'"error"'),  # /v1/completions chunks
    "llamacpp": (b'"stop":false', b'"stop":true', b'"error"'),  # llama-server's /completion frames
}
MARKER_TAIL = 16  # bytes of the previous read kept, so a marker split over two reads is seen


@dataclass(slots=True)
class RunSpec:
    url: str  # the target's base URL
    shape: str  # v2 | v1 | admit
    dialect: str = "orchd-sse"
    tokens: int = 50
    model: str = "fast.gguf"
    prompt_words: int = 64
    concurrency: int | None = None  # closed loop
    rate: float | None = None  # open loop, tasks per second
    arrivals: str = "constant"  # constant | poisson
    times: list[float] | None = None  # open loop from a trace: send times in seconds from the start
    duration_s: float = 5.0  # the measured window
    warmup_s: float = 1.0  # sent and discarded before the window
    max_tasks: int | None = None  # stop sending after this many (measured) tasks
    task_timeout_s: float = 30.0
    seed: int = 0
    path_v2: str = "/v2/tasks"
    path_v1: str = "/v1/completions"
    watch_pid: int | None = None  # the server under test: its CPU time and memory at the window's edges
    extra: dict = field(default_factory=dict)  # merged into every request body


@dataclass(slots=True)
class Record:
    """Parallel lists, one entry per measured task (times in ms from the window's start; NaN, which
    is ``null`` in the JSON result, for a moment that never came)."""

    scheduled: list[float] = field(default_factory=list)
    admitted: list[float] = field(default_factory=list)  # the 202 or the headers; NaN when refused
    first: list[float] = field(default_factory=list)  # the first token; NaN when none
    ended: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    outcome: list[str] = field(default_factory=list)

    def add(self, scheduled: float, admitted: float, first: float, ended: float, tokens: int, outcome: str) -> None:
        self.scheduled.append(scheduled)
        self.admitted.append(admitted)
        self.first.append(first)
        self.ended.append(ended)
        self.tokens.append(tokens)
        self.outcome.append(outcome)


NAN = float("nan")
#: Every time here: uvloop's own clock (``loop.time()``) moves in whole milliseconds, too coarse
#: for latencies of a few.
clock = time.perf_counter


class LoadClient:
    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.record = Record()
        self.window_start = 0.0
        self.window_end = 0.0
        self.sent = 0
        self.stopped_at: float | None = None  # the closed loop's max_tasks reached before the window's end
        self.prompt = " ".join(["lorem"] * spec.prompt_words)
        self.token_marker, self.end_marker, self.error_marker = DIALECTS[spec.dialect]
        self.session: aiohttp.ClientSession | None = None

    def body(self) -> bytes:
        spec = self.spec
        if spec.shape == "v1":
            body = {"model": spec.model, "prompt": self.prompt, "max_tokens": spec.tokens, "stream": True}
        else:
            body = {"task_id": str(uuid.uuid4()), "session_id": str(uuid.uuid4()), "workload": "completion",
                    "model_ref": spec.model, "engine": "llamacpp", "ctx": 8192, "priority": "interactive",
                    "max_tokens": spec.tokens, "expected_tokens": spec.tokens, "deadline_ms": 3_600_000,
                    "prompt": self.prompt}
        body.update(spec.extra)
        return orjson.dumps(body)

    async def one(self, scheduled: float) -> None:
        """One task, timed from ``scheduled`` (loop time); recorded when scheduled inside the window."""
        spec, session = self.spec, self.session
        assert session is not None
        admitted = first = NAN
        tokens, outcome = 0, "ok"
        post = spec.path_v1 if spec.shape == "v1" else spec.path_v2
        try:
            async with asyncio.timeout(spec.task_timeout_s):
                async with session.post(spec.url + post, data=self.body(),
                                        headers={"Content-Type": "application/json"}) as resp:
                    admitted = clock()
                    if resp.status >= 300:
                        outcome = f"http_{resp.status}"
                        await resp.read()
                    elif spec.shape == "v1":
                        tokens, first, outcome = await self.read_stream(resp)
                    else:
                        answer = orjson.loads(await resp.read())
                if outcome == "ok" and spec.shape == "v2":
                    async with session.get(f"{spec.url}{spec.path_v2}/{answer['task_id']}/events") as resp:
                        if resp.status != 200:
                            outcome = f"http_{resp.status}"
                            await resp.read()
                        else:
                            tokens, first, outcome = await self.read_stream(resp)
        except TimeoutError:
            outcome = "timeout"
        except (aiohttp.ClientError, OSError) as exc:
            outcome = f"conn_{type(exc).__name__}"
        ended = clock()
        if self.window_start <= scheduled < self.window_end:
            base = self.window_start
            self.record.add((scheduled - base) * 1000, (admitted - base) * 1000, (first - base) * 1000,
                            (ended - base) * 1000, tokens, outcome)

    async def read_stream(self, resp: aiohttp.ClientResponse) -> tuple[int, float, str]:
        token_marker, end_marker, error_marker = self.token_marker, self.end_marker, self.error_marker
        tokens, first, tail = 0, NAN, b""
        seen_end = seen_error = False
        async for chunk in resp.content.iter_any():
            n = chunk.count(token_marker)
            if n:
                if tokens == 0:
                    first = clock()
                tokens += n
            window = tail + chunk[:64] if tail else chunk
            if end_marker in chunk or end_marker in window:
                seen_end = True
            if error_marker in chunk or error_marker in window:
                seen_error = True
            tail = chunk[-MARKER_TAIL:]
        if seen_error:
            return tokens, first, "stream_error"
        if not seen_end:
            return tokens, first, "no_end"
        if self.spec.dialect == "llamacpp":
            tokens = max(0, tokens)  # the final frame says stop:true, not counted
        return tokens, first, "ok"

    async def run(self) -> dict:
        spec = self.spec
        loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=False)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
            self.session = session
            start = clock()
            self.window_start = start + spec.warmup_s
            self.window_end = self.window_start + spec.duration_s
            samples: dict[str, dict] = {}
            if spec.watch_pid is not None:
                for edge, when in (("start", self.window_start), ("end", self.window_end)):
                    loop.call_later(when - clock(),
                                    lambda edge=edge: samples.__setitem__(edge, process_sample(spec.watch_pid)))
            if spec.concurrency is not None:
                await self.closed_loop(spec.concurrency)
            else:
                await self.open_loop(start)
            if spec.watch_pid is not None and "end" not in samples:
                samples["end"] = process_sample(spec.watch_pid)
        return {"spec": {k: getattr(spec, k) for k in spec.__slots__ if k != "times"},
                "window_s": min(self.window_end, self.stopped_at or self.window_end) - self.window_start, "sent": self.sent, "server": samples,
                "record": {k: getattr(self.record, k) for k in self.record.__slots__}}

    async def closed_loop(self, concurrency: int) -> None:
        spec = self.spec

        async def worker() -> None:
            while True:
                now = clock()
                if now >= self.window_end:
                    return
                if spec.max_tasks is not None and self.sent >= spec.max_tasks:
                    self.stopped_at = min(self.stopped_at or now, now)
                    return
                if now >= self.window_start:
                    self.sent += 1
                await self.one(now)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    def schedule(self, start: float) -> list[float]:
        """Send times (loop time) for the open loop, warm-up included."""
        spec = self.spec
        if spec.times is not None:
            times = [start + t for t in spec.times]
            self.window_start = start
            self.window_end = (times[-1] if times else start) + 1e-6
            return times
        assert spec.rate is not None and spec.rate > 0
        rng = random.Random(spec.seed)
        times, t, end = [], start, self.window_end
        limit, measured = spec.max_tasks, 0
        while t < end:
            times.append(t)
            measured += t >= self.window_start
            if limit is not None and measured >= limit:
                break
            t += rng.expovariate(spec.rate) if spec.arrivals == "poisson" else 1.0 / spec.rate
        return times

    async def open_loop(self, start: float) -> None:
        spec = self.spec
        pending: set[asyncio.Task] = set()
        for due in self.schedule(start):
            delay = due - clock()
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival process itself, not a synchronisation
            if due >= self.window_start:
                self.sent += 1
            task = asyncio.ensure_future(self.one(due))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:  # the stragglers get their own timeout; nothing waits past it
            await asyncio.wait(pending, timeout=spec.task_timeout_s + 1)
            for task in pending:
                task.cancel()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_sample(pid: int) -> dict:
    """A process's CPU seconds (user + system) and resident memory now, from ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/status", "rb") as f:
            status = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
    except OSError:
        return {}
    kib = lambda name: int(status.get(name, b"0 kB").split()[0])  # noqa: E731
    return {"cpu_s": (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, "rss_bytes": kib(b"VmRSS") * 1024,
            "hwm_bytes": kib(b"VmHWM") * 1024, "t": time.monotonic()}


def run(spec: RunSpec) -> dict:
    """One run, in this process."""
    started = time.monotonic()
    result = run_loop(LoadClient(spec).run())
    result["client_wall_s"] = time.monotonic() - started
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m llama_orch.io.bench.client SPEC_JSON OUT``: one run, its result as JSON in the file
    OUT (not stdout: the event loop may leave stdout non-blocking, and a large result would be cut)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m llama_orch.io.bench.client SPEC_JSON OUT", file=sys.stderr)
        return 2
    spec = RunSpec(**json.loads(args[0]))
    result = orjson.dumps(run(spec))
    with open(args[1], "wb") as out:
        out.write(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
