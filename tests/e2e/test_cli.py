"""``llama-orch up``, ``submit`` and ``status`` as an operator runs them: real processes, real ports.

``up`` is run as a child of the test; what it prints (URLs and pids) is how the test finds the
cluster, so the banner is part of what is tested. After ``up`` exits, none of its daemons and
none of its engines may be running."""

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest
from cluster_support import CACHE, free_port

from llama_orch.io.local_cluster import process_alive
from llama_orch.io.provisioner.mock_engine import WORDS

CLI = [sys.executable, "-m", "llama_orch.cli"]
DAEMON_LINE = re.compile(r"^\s+(orchestratord|pool-managerd|engine-provisioner)\s+(http://\S+)\s+pid (\d+)", re.M)
POOL_LINE = re.compile(r"^\s+(pool-\d+)\s+(http://\S+)\s+pid (\d+)", re.M)


def up_args(tmp_path, port: int, *more: str) -> list[str]:
    # Only orchestratord's port is fixed (the test talks to it); the other two are picked free.
    return [*CLI, "up", "--port", str(port), "--pool-managerd-port", "0", "--provisioner-port", "0",
            "--state-dir", str(tmp_path / "state"), "--cache-dir", str(CACHE), *more]


def banner_pids(stdout: str) -> dict[str, int]:
    found = {name: int(pid) for name, _, pid in DAEMON_LINE.findall(stdout)}
    found.update({f"engine {name}": int(pid) for name, _, pid in POOL_LINE.findall(stdout)})
    return found


def assert_all_gone(pids: dict[str, int]) -> None:
    deadline = time.monotonic() + 10  # an engine orphaned by a killed provisioner is reaped by init
    while (alive := {n: p for n, p in pids.items() if process_alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, f"still running after `up` exited: {alive}"


def test_up_once_with_mock_engines_streams_a_sample_and_stops_everything(tmp_path):
    port = free_port()
    out = subprocess.run(up_args(tmp_path, port, "--engine", "mock", "--pools", "2", "--once",
                                 "--sample", "hello llama", "--sample-tokens", "16"),
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr

    assert f"orchestratord       http://127.0.0.1:{port}" in out.stdout
    daemons = {name: url for name, url, _ in DAEMON_LINE.findall(out.stdout)}
    assert set(daemons) == {"orchestratord", "pool-managerd", "engine-provisioner"}, out.stdout
    pools = POOL_LINE.findall(out.stdout)
    assert [name for name, _, _ in pools] == ["pool-0", "pool-1"], out.stdout
    assert f'llama-orch submit "Why is the sky blue?" --url http://127.0.0.1:{port}' in out.stdout

    sample = out.stdout.split("--- sample task", 1)[1].splitlines()[1]
    assert len(sample.split()) == 16 and set(sample.split()) <= set(WORDS), sample  # the mock engine's words
    assert "tokens_out=16" in out.stderr and "nothing left running" in out.stderr, out.stderr
    assert_all_gone(banner_pids(out.stdout))
    logs = tmp_path / "state" / "logs"
    assert {p.name for p in logs.iterdir()} == {"orchestratord.log", "pool-managerd.log", "engine-provisioner.log"}


async def _read_until(stream: asyncio.StreamReader, marker: str, timeout: float) -> str:
    """Lines from ``stream`` up to the one containing ``marker`` (a deadline, not a sleep)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} within {timeout} s; got:\n" + "".join(seen)
        line = await asyncio.wait_for(stream.readline(), remaining)
        assert line, f"stream ended before {marker!r}; got:\n" + "".join(seen)
        seen.append(line.decode(errors="replace"))
        if marker in seen[-1]:
            return "".join(seen)


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*CLI, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def test_up_with_llama_server_then_submit_status_and_ctrl_c(llama_server, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    err_path = tmp_path / "up.stderr"
    with err_path.open("wb") as err:
        up = await asyncio.create_subprocess_exec(*up_args(tmp_path, port, "--pools", "1"),
                                                  stdout=subprocess.PIPE, stderr=err, cwd=tmp_path)
    try:
        try:
            banner = await _read_until(up.stdout, "Ctrl-C stops everything", timeout=60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstderr:\n{err_path.read_text()}") from None
        pids = banner_pids(banner)
        assert f"orchestratord       {url}" in banner and "pool-0" in banner, banner
        pool_line = next(line for line in banner.splitlines() if line.strip().startswith("pool-0"))
        assert "llamacpp" in pool_line and "mock" not in pool_line, pool_line  # the real engine and its version

        # The printed pool-managerd URL is real and agrees with the printed engine pid.
        pmd_url = next(u for name, u, _ in DAEMON_LINE.findall(banner) if name == "pool-managerd")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(f"{pmd_url}/v2/pools") as r:
                managed = (await r.json())["pools"]
        assert [p["engine_pid"] for p in managed] == [pids["engine pool-0"]]

        code, out, err_text = await _cli("submit", "The capital of France is", "--url", url, "--max-tokens", "12")
        assert code == 0, out + err_text
        assert out.strip(), "no tokens printed"  # real text from the tiny model
        assert "tokens_out=12" in err_text and "pool=pool-0" in err_text, err_text

        code, out, err_text = await _cli("status", "--url", url)
        assert code == 0, err_text
        header, *rows = out.strip().splitlines()
        assert header.split()[:2] == ["POOL", "READY"]
        assert len(rows) == 1 and rows[0].split()[:3] == ["pool-0", "yes", "2/2"], out

        up.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does
        assert await asyncio.wait_for(up.wait(), 45) == 0, err_path.read_text()
        assert "nothing left running" in err_path.read_text()
        assert_all_gone(pids)
    finally:
        if up.returncode is None:
            up.kill()
            await up.wait()


def test_up_tls_serves_every_daemon_over_mtls_and_the_sample_streams(tmp_path):
    port = free_port()
    out = subprocess.run(up_args(tmp_path, port, "--engine", "mock", "--tls", "--once", "--sample-tokens", "8"),
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    certs = tmp_path / "state" / "certs"
    daemons = dict(re.findall(r"^\s+(orchestratord|pool-managerd|engine-provisioner)\s+(\S+)\s+pid", out.stdout, re.M))
    assert daemons == {"orchestratord": f"https://127.0.0.1:{port}", "pool-managerd": daemons["pool-managerd"],
                       "engine-provisioner": daemons["engine-provisioner"]}, out.stdout
    assert all(url.startswith("https://") for url in daemons.values()), daemons
    assert f"export LLAMA_ORCH_CA={certs / 'ca.pem'}" in out.stdout
    assert re.search(r"^tokens_out=8 ", out.stderr, re.M), out.stderr  # the sample streamed, over https
    for name in ("orchestratord", "pool-managerd", "engine-provisioner", "client"):
        assert (certs / f"{name}.pem").exists() and (certs / f"{name}-key.pem").stat().st_mode & 0o077 == 0
    logs = tmp_path / "state" / "logs"
    assert "listening on https://" in (logs / "orchestratord.log").read_text()
    assert "listening on https://" in (logs / "pool-managerd.log").read_text()
    assert "control API on https://" in (logs / "engine-provisioner.log").read_text()
    assert "TLS:" not in "".join(p.read_text() for p in logs.glob("*.log"))  # no hop failed its handshake


def test_log_format_json_gives_every_daemon_json_lines_with_the_task_context(tmp_path):
    import json
    import os

    out = subprocess.run(up_args(tmp_path, free_port(), "--engine", "mock", "--once", "--sample-tokens", "8"),
                         capture_output=True, text=True, timeout=60, cwd=tmp_path, env=dict(os.environ, LOG_FORMAT="json"))
    assert out.returncode == 0, out.stdout + out.stderr
    logs = tmp_path / "state" / "logs"
    lines = {}
    for name in ("orchestratord", "pool-managerd", "engine-provisioner"):
        lines[name] = [json.loads(line) for line in (logs / f"{name}.log").read_text().splitlines()
                       if line.startswith("{")]  # the engines' own output (not ours) may be in the provisioner's log
        assert lines[name] and all(r["daemon"] == name and r["level"] and r["ts"].endswith("Z") for r in lines[name])
    ends = [r for r in lines["orchestratord"] if r.get("outcome") == "completed"]
    assert len(ends) == 1, lines["orchestratord"]
    end = ends[0]
    assert end["pool_id"] == "pool-0" and end["replica_id"] == "r0" and end["tokens_out"] == 8
    assert end["total_ms"] > 0 and end["decode_ms"] >= 0 and end["task_id"] and end["correlation_id"]
    access = [r for r in lines["orchestratord"] if r.get("path") == f"/v2/tasks/{end['task_id']}/events"]
    assert access and access[0]["status"] == 200 and access[0]["duration_ms"] > 0
    bad = subprocess.run([sys.executable, "-m", "llama_orch.io.orchestratord"], capture_output=True, text=True,
                         timeout=30, env=dict(os.environ, LOG_FORMAT="yaml"))
    assert bad.returncode == 2 and bad.stderr.strip() == "orchestratord: error: LOG_FORMAT='yaml': expected text or json"


def test_certs_writes_a_ca_and_prints_each_daemons_variables(tmp_path):
    out = subprocess.run([*CLI, "certs", str(tmp_path / "c"), "--host", "gpu-1.internal", "--service", "pool-managerd"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"POOL_MANAGERD_TLS_CERT={tmp_path / 'c' / 'pool-managerd.pem'}" in out.stdout
    assert f"POOL_MANAGERD_TLS_CA={tmp_path / 'c' / 'ca.pem'}" in out.stdout
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["ca-key.pem", "ca.pem", "pool-managerd-key.pem",
                                                                  "pool-managerd.pem"]
    bad = subprocess.run([*CLI, "certs", str(tmp_path / "d"), "--service", "../x"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "--service '../x'" in bad.stderr and not (tmp_path / "d").exists()


@pytest.mark.parametrize("flag", ["--port", "--pool-managerd-port", "--provisioner-port"])
def test_a_busy_port_is_one_line_naming_the_flag_and_exit_2(tmp_path, flag):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        ports = {"--port": str(free_port()), "--pool-managerd-port": "0", "--provisioner-port": "0", flag: str(busy)}
        out = subprocess.run([*CLI, "up", "--engine", "mock", "--state-dir", str(tmp_path / "state"),
                              *(x for kv in ports.items() for x in kv)],
                             capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"port {busy}" in out.stderr and f"pass {flag}" in out.stderr, out.stderr
    assert not (tmp_path / "state" / "logs").exists()  # nothing was started


def test_a_second_up_on_the_same_state_dir_is_refused(tmp_path):
    """Two clusters on one state dir would delete each other's handoff files."""
    import fcntl

    state = tmp_path / "state"
    state.mkdir()
    with (state / "up.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("12345")
        lock.flush()
        out = subprocess.run([*CLI, "up", "--engine", "mock", "--state-dir", str(state), "--port", "0",
                              "--pool-managerd-port", "0", "--provisioner-port", "0"],
                             capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "in use by another `llama-orch up` (pid 12345)" in out.stderr, out.stderr


def test_a_pool_that_cannot_start_ends_up_with_the_cause_and_exit_1(llama_server, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)  # a GGUF header, no model: llama-server exits
    out = subprocess.run(up_args(tmp_path, free_port(), "--model", str(bad), "--once", "--ready-timeout-s", "50"),
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "pool-0 failed: engine exited with status" in out.stderr, out.stderr
    assert "nothing left running" in out.stderr


@pytest.mark.parametrize("args, expected", [
    (["up", "--pools", "0"], "--pools must be >= 1"),
    (["up", "--engine", "vllm"], "invalid choice: 'vllm'"),
    (["up", "--port", "70000"], "--port must be a port number"),
    (["up", "--port", "9200", "--pool-managerd-port", "9200"], "both 9200"),
    (["up", "--model", "ftp://x/y.gguf", "--port", "0", "--pool-managerd-port", "0", "--provisioner-port", "0"],
     "unsupported scheme"),
    (["submit", "hi", "--max-tokens", "0"], "--max-tokens must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, expected):
    out = subprocess.run([*CLI, *args, "--state-dir", str(tmp_path)] if args[0] == "up" else [*CLI, *args],
                         capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and expected in out.stderr, out.stderr


@pytest.mark.parametrize("command", ["submit", "status"])
def test_no_orchestratord_is_a_clear_error_and_exit_1(command):
    url = f"http://127.0.0.1:{free_port()}"
    args = [command, "hello", "--url", url] if command == "submit" else [command, "--url", url]
    out = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"cannot reach orchestratord at {url}" in out.stderr and "llama-orch up" in out.stderr, out.stderr


async def test_ctrl_c_while_starting_stops_everything_and_exits_130(tmp_path):
    err_path = tmp_path / "up.stderr"
    up = await asyncio.create_subprocess_exec(*up_args(tmp_path, free_port(), "--engine", "mock", "--pools", "2"),
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        started = await _read_until(up.stderr, "started orchestratord", timeout=30)
        up.send_signal(signal.SIGINT)
        rest = (await asyncio.wait_for(up.stderr.read(), 45)).decode(errors="replace")
        assert await asyncio.wait_for(up.wait(), 10) == 130, started + rest
    finally:
        if up.returncode is None:
            up.kill()
            await up.wait()
    err_path.write_text(started + rest)
    assert "nothing left running" in rest, started + rest
    pids = {name: int(pid) for name, pid in re.findall(r"started (\S+) \(pid (\d+)", started)}
    log = (tmp_path / "state" / "logs" / "engine-provisioner.log").read_text()
    pids.update({f"engine {n}": int(pid) for n, pid in re.findall(r"pool (\S+): started \S+ \(pid (\d+)\)", log)})
    assert len(pids) >= 3
    assert_all_gone(pids)


async def test_a_killed_up_takes_its_daemons_and_engines_with_it(tmp_path):
    """SIGKILL leaves ``up`` no time to stop anything: the daemons get SIGTERM from the kernel
    (parent-death signal) and the provisioner stops its engines as usual."""
    up = await asyncio.create_subprocess_exec(*up_args(tmp_path, free_port(), "--engine", "mock"),
                                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        banner = await _read_until(up.stdout, "Ctrl-C stops everything", timeout=30)
    finally:
        up.kill()
        await up.wait()
    pids = banner_pids(banner)
    assert len(pids) == 4, banner
    assert_all_gone(pids)
