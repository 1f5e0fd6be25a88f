"""Hostile and careless clients against a live cluster on loopback, then a check that it still serves.

Oversized and deeply nested JSON, NUL and control characters, an SSE injection in a prompt, slow
bodies, and a thousand SSE readers dropped with TCP resets. After all of it: twenty ordinary
tasks stream end to end, nothing is left queued or running, the process's memory is back within
a bound, and not one log line was written at ERROR.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request

import pytest
from live_cluster import MODEL, LiveCluster
from support import read_then_reset, task_body

from llama_orch.ext.sse import SSEParser
from llama_orch.io.orchestratord.driver import DRIVER

PAGE = 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    cluster = LiveCluster(tmp_path_factory.mktemp("hostile"), admission_capacity=2000, tokens_per_s=400).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def errors(caplog):
    """Log records at ERROR and above, from every thread, while the test runs."""
    caplog.set_level(logging.INFO)
    yield lambda: [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


def task(**kw) -> dict:
    return task_body(MODEL, **{"ctx": 256, "deadline_ms": 30_000, **kw})


def post(url: str, data: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw.startswith(b"{") else {"raw": raw[:200].decode("latin-1")}


def events(url: str, task_id: str) -> list[tuple[str, dict]]:
    with urllib.request.urlopen(f"{url}/v2/tasks/{task_id}/events", timeout=30) as r:
        parser = SSEParser()
        return [(name, json.loads(data)) for name, data in parser.feed(r.read())]


def run(live: LiveCluster, coro):
    return asyncio.run_coroutine_threadsafe(coro, live.loop).result(120)


def test_oversized_and_deeply_nested_bodies_are_refused_by_name(live, errors):
    url = live.urls["orchestratord"]
    for path in ("/v2/tasks", "/v1/chat/completions", "/v1/completions"):
        status, _ = post(url + path, b'{"prompt": "' + b"x" * (2 << 20) + b'"}')
        assert status == 413, (path, status)
        status, body = post(url + path, b"[" * 100_000 + b"]" * 100_000)
        assert status == 400 and "JSON" in (body.get("message") or body["error"]["message"]), (path, body)
    status, body = post(url + "/v2/tasks", json.dumps(task(prompt={"a": [[[[[[[[1]]]]]]]]})).encode())
    assert status == 400 and body["field"] == "prompt"
    assert not errors()


def test_nul_and_control_characters(live, errors):
    url = live.urls["orchestratord"]
    body = task(prompt="a\x00b\x01\x1b[2J\r\nc\u2028d")
    status, answer = post(url + "/v2/tasks", json.dumps(body).encode())
    assert status == 202, answer
    kinds = [k for k, _ in events(url, body["task_id"])]
    assert kinds[0] in ("started", "metrics") and kinds[-1] == "end"
    for bad in ({"task_id": "0f8fad5b-d9cb-469f-a165-70867728950\x00"}, {"model_ref": "\x00"},
                {"priority": "interactive\x00"}, {"engine": "llama\ncpp"}):
        status, answer = post(url + "/v2/tasks", json.dumps(task(**bad)).encode())
        assert status in (400, 503) and answer["code"] in ("INVALID_PARAMS", "POOL_UNREADY"), (bad, answer)
    status, answer = post(url + "/v1/chat/completions", json.dumps({
        "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "\x00\x07\x1b"}]}).encode())
    assert status == 200 and answer["choices"][0]["message"]["content"], answer
    assert not errors()


def test_an_sse_injection_in_the_prompt_stays_inside_one_event(live, errors):
    url = live.urls["orchestratord"]
    body = task(prompt='x\n\nevent: end\ndata: {"tokens_out": 0}\n\nevent: token\ndata: {"t":"forged","i":0}\n\n')
    assert post(url + "/v2/tasks", json.dumps(body).encode())[0] == 202
    got = events(url, body["task_id"])
    kinds = [k for k, _ in got]
    assert kinds.count("end") == 1 and kinds[-1] == "end"
    assert [d["i"] for k, d in got if k == "token"] == list(range(8))
    assert all(d["t"] != "forged" for k, d in got if k == "token")
    assert not errors()


def test_slow_bodies_do_not_hold_up_other_clients(live, errors):
    url = live.urls["orchestratord"]
    port = int(url.rsplit(":", 1)[1])

    async def slow_bodies():
        writers = []
        for _ in range(50):  # 50 clients send headers and a third of a body, then nothing
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v2/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 300\r\n\r\n" + b'{"task_id": "')
            await writer.drain()
            writers.append(writer)
        return writers

    writers = run(live, slow_bodies())
    try:
        for _ in range(5):  # meanwhile, ordinary clients are served
            body = task()
            assert post(url + "/v2/tasks", json.dumps(body).encode())[0] == 202
            assert events(url, body["task_id"])[-1][0] == "end"
    finally:
        async def close():
            for w in writers:
                w.close()
        run(live, close())
    assert not errors()


def test_a_thousand_readers_dropped_with_resets_then_the_cluster_still_serves(live, errors):
    url = live.urls["orchestratord"]
    port = int(url.rsplit(":", 1)[1])
    driver = None
    for runner in live.runners:
        if DRIVER in runner.app:
            driver = runner.app[DRIVER]
    assert driver is not None
    rss_before = rss_bytes()
    bodies = [task(max_tokens=200) for _ in range(100)]  # 8 slots: most of them queued
    for body in bodies:
        assert post(url + "/v2/tasks", json.dumps(body).encode())[0] == 202

    async def thousand():
        for wave in range(10):  # 10 waves of 100 readers, one per task, all reset
            await asyncio.gather(*(read_then_reset(port, b["task_id"], read=200) for b in bodies))

    run(live, thousand())

    async def drained():
        deadline = asyncio.get_running_loop().time() + 30
        while driver.core.tasks:
            assert asyncio.get_running_loop().time() < deadline, f"{len(driver.core.tasks)} tasks left"
            await asyncio.sleep(0.05)

    run(live, drained())  # every task canceled once its readers were gone: nothing queued or running
    canceled = driver.metrics.total(driver.metrics.canceled, reason="disconnect")
    assert canceled >= 90, f"only {canceled} of 100 tasks were canceled by their readers' resets"
    for _ in range(20):
        body = task(max_tokens=16)
        assert post(url + "/v2/tasks", json.dumps(body).encode())[0] == 202
        got = events(url, body["task_id"])
        assert got[-1][0] == "end" and [d["i"] for k, d in got if k == "token"] == list(range(16))
    assert not errors(), errors()[:5]
    grown = rss_bytes() - rss_before
    assert grown < 64 << 20, f"the process grew by {grown >> 20} MiB"
