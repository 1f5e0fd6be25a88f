"""Test helpers shared by the core and simulator tests: builders and a checking driver."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from llama_orch.core.commands import Admitted, Finish, ForwardTokens, Rejected
from llama_orch.core.errors import InvariantViolation
from llama_orch.core.orchestrator import Orchestrator
from llama_orch.core.types import PoolSnapshot, Priority, TaskSpec

MODEL = "file:/models/tiny.gguf"
_ids = itertools.count()


def pool(pool_id: str, **kw) -> PoolSnapshot:
    base = dict(pool_id=pool_id, ready=True, slots_total=2, slots_free=2, vram_total_bytes=24 << 30,
                vram_free_bytes=20 << 30, model_ref=MODEL, ctx_max=4096, device_mask="0", replica_id=pool_id,
                engine_url=f"http://127.0.0.1/{pool_id}")
    base.update(kw)
    return PoolSnapshot(**base)


def spec(task_id: str | None = None, **kw) -> TaskSpec:
    base = dict(task_id=task_id or f"task-{next(_ids)}", session_id="s-1", model_ref=MODEL,
                priority=Priority.INTERACTIVE, ctx=512, max_tokens=8, deadline_ms=60_000)
    base.update(kw)
    return TaskSpec(**base)


def task_body(model: str, /, **kw) -> dict:
    """A ``POST /v2/tasks`` body for ``model`` with fresh task and session ids; ``kw`` overrides any
    field (``model_ref`` included)."""
    import uuid

    body = {"task_id": str(uuid.uuid4()), "session_id": str(uuid.uuid4()), "workload": "completion",
            "model_ref": model, "engine": "llamacpp", "ctx": 512, "priority": "interactive", "max_tokens": 8,
            "deadline_ms": 60_000, "prompt": "hello"}
    body.update(kw)
    return body


class Ledger:
    """Feeds an orchestrator and checks every command against the task-life invariants."""

    def __init__(self, core: Orchestrator) -> None:
        self.core = core
        self.answers: dict[str, object] = {}
        self.finishes: dict[str, Finish] = {}
        self.tokens: dict[str, int] = {}
        self.log: list = []

    def __call__(self, event, now: float) -> tuple:
        out = self.core.handle(event, now)
        for cmd in out:
            self.log.append(cmd)
            if isinstance(cmd, (Admitted, Rejected)):
                if cmd.task_id in self.answers and isinstance(self.answers[cmd.task_id], Admitted):
                    raise InvariantViolation(f"second admission answer for {cmd.task_id}")
                self.answers[cmd.task_id] = cmd
            elif isinstance(cmd, Finish):
                if cmd.task_id in self.finishes:
                    raise InvariantViolation(f"{cmd.task_id} finished twice")
                if not isinstance(self.answers.get(cmd.task_id), Admitted):
                    raise InvariantViolation(f"{cmd.task_id} finished without being admitted")
                self.finishes[cmd.task_id] = cmd
            elif isinstance(cmd, ForwardTokens):
                if cmd.task_id in self.finishes:
                    raise InvariantViolation(f"token for {cmd.task_id} after its terminal event")
                if cmd.first_index != self.tokens.get(cmd.task_id, 0):
                    raise InvariantViolation(f"{cmd.task_id}: token index gap")
                self.tokens[cmd.task_id] = cmd.first_index + cmd.count
        self.core.check_invariants()
        return out

    def of(self, kind, task_id: str | None = None) -> list:
        return [c for c in self.log if isinstance(c, kind) and (task_id is None or c.task_id == task_id)]


def wait_until(check, timeout: float = 30.0, what: str = "condition"):
    """``eventually`` for plain functions: ``check()`` until truthy (returned), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.05)


def _describe(what) -> str:
    return what() if callable(what) else what


async def eventually(check, timeout: float = 30.0, what="condition"):
    """Await ``check()`` (or call it: a plain function works too) until it returns something
    truthy (returned), or fail after ``timeout``.

    ``what`` names the condition in the failure; a callable is asked then, for logs as they are at the end."""
    deadline = time.monotonic() + timeout
    while True:
        try:  # a check that never answers fails at the deadline too, rather than at pytest's timeout
            async with asyncio.timeout(max(0.5, deadline - time.monotonic())):
                result = check()
                if inspect.isawaitable(result):
                    result = await result
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {_describe(what)}: a check did not answer in time") from None
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {_describe(what)}"
        await asyncio.sleep(0.02)


async def read_then_reset(port: int, task_id: str, *, read: int = 100) -> None:
    """An SSE reader of a task on 127.0.0.1:``port`` that reads a little, then drops its connection
    with a TCP reset (SO_LINGER 0), as a client that crashed or lost its network would."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /v2/tasks/{task_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    await reader.read(read)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def running(*argvs: list[str], timeout: float = 30.0):
    """Start ``python -m <argv>`` for each argv at once; yield their READY URLs; on the way out,
    SIGTERM them and check each exited 0 with no traceback on stderr."""
    procs: list[tuple[subprocess.Popen, object]] = []
    try:
        for argv in argvs:
            err = tempfile.TemporaryFile()
            procs.append((subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                           stderr=err), err))
        deadline = time.monotonic() + timeout
        urls = []
        for proc, err in procs:
            readable, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = proc.stdout.readline().decode() if readable else ""
            if not line.startswith("READY http://"):
                err.seek(0)
                pytest.fail(f"{proc.args[2:]} gave no READY line within {timeout:.0f} s: {line!r}\n"
                            f"{err.read().decode(errors='replace')[-3000:]}")
            urls.append(line.split()[1])
        yield urls
        for proc, err in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, err in procs:
            assert proc.wait(timeout=10) == 0, f"{proc.args[2:]} exited {proc.returncode} on SIGTERM"
            err.seek(0)
            stderr = err.read().decode(errors="replace")
            assert "Traceback" not in stderr, stderr[-3000:]
    finally:
        for proc, err in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            err.close()
