"""Handoff files: atomic writes, the contract's fields and aliases, named errors."""

import orjson
import pytest

from llama_orch.io.handoff import (
    Handoff,
    HandoffError,
    parse_handoff,
    read_handoff,
    write_handoff,
)


def test_round_trip_and_atomic_write(tmp_path):
    h = Handoff(pool_id="pool-0", replica_id="r0", url="http://127.0.0.1:41231", engine_version="b1234",
                model_id="file:/m/tiny.gguf", model_path="/m/tiny.gguf", flags=("--parallel", "4"),
                device_mask="0", slots_total=4, ctx=2048, pid=1234)
    path = write_handoff(tmp_path, h)
    assert path.name == "pool-0-r0.json" and [p.name for p in tmp_path.iterdir()] == ["pool-0-r0.json"]
    data = orjson.loads(path.read_bytes())
    assert data["model"] == {"id": "file:/m/tiny.gguf", "path": "/m/tiny.gguf"} and data["slots_total"] == 4
    assert read_handoff(path) == h


def test_reader_accepts_the_contract_aliases():
    h = parse_handoff("x.json", orjson.dumps({"pool_id": "p", "replica_id": "r1", "http_endpoint": "http://h:1",
                                              "slots": 3, "provisioning_mode": "mock"}))
    assert (h.url, h.slots_total, h.provisioning_mode, h.engine) == ("http://h:1", 3, "mock", "llamacpp")


@pytest.mark.parametrize("raw, message", [
    (b'{"pool_id": "p", "url": "http://h:1"', "not valid JSON"),
    (b"[]", "expected a JSON object"),
    (b'{"url": "http://h:1"}', "missing field 'pool_id'"),
    (b'{"pool_id": "p"}', "missing field 'url'"),
    (b'{"pool_id": "p", "url": "h:1"}', "http(s) URL"),
    (b'{"pool_id": "p", "url": "http://h:1", "slots_total": -1}', "'slots_total' must be an integer"),
    (b'{"pool_id": "p", "url": "http://h:1", "slots_total": 0}', "'slots_total' must be >= 1"),
    (b'{"pool_id": "p", "url": "http://h:1", "provisioning_mode": "magic"}', "provisioning_mode"),
    (b'{"pool_id": "p", "url": "http://h:1", "flags": "-c 1"}', "'flags' must be a list"),
    (b"", "not valid JSON"),
])
def test_malformed_files_are_named(raw, message):
    with pytest.raises(HandoffError) as err:
        parse_handoff("/run/pool-x.json", raw)
    assert "/run/pool-x.json" in str(err.value) and message in str(err.value)
