"""POST /v2/tasks bodies: every field validated, the error names it, unknown fields ignored."""

import uuid

import pytest

from llama_orch.core.types import Determinism, PlacementMode, Priority
from llama_orch.io.orchestratord.wire import WireError, parse_task_request


def body(**kw):
    base = {"task_id": str(uuid.UUID(int=1)), "session_id": str(uuid.UUID(int=2)), "workload": "completion",
            "model_ref": "file:/models/tiny.gguf", "engine": "llamacpp", "ctx": 512, "priority": "interactive",
            "max_tokens": 32, "deadline_ms": 10_000, "prompt": "hello"}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not ...}


def test_a_full_request_parses():
    spec, payload = parse_task_request(body(
        seed=7, determinism="strict", sampler_profile_version="v1", expected_tokens=20, kv_hint="reuse",
        placement={"mode": "pin", "pin_pool_id": "pool-0", "avoid_pools": ["pool-1"], "allow_fallback": False},
        something_new={"ignored": True}))
    assert spec.task_id == str(uuid.UUID(int=1)) and spec.priority is Priority.INTERACTIVE
    assert spec.determinism is Determinism.STRICT and spec.seed == 7 and spec.expected_tokens == 20
    assert spec.placement.mode is PlacementMode.PIN and spec.placement.pin_pool_id == "pool-0"
    assert spec.placement.avoid_pools == ("pool-1",) and spec.placement.allow_fallback is False
    assert payload.prompt == "hello" and payload.kv_hint == "reuse" and payload.seed == 7


def test_deadline_zero_is_left_to_admission():
    spec, _ = parse_task_request(body(deadline_ms=0))
    assert spec.deadline_ms == 0


@pytest.mark.parametrize("change, field, message", [
    ({"task_id": ...}, "task_id", "is required"),
    ({"task_id": "not-a-uuid"}, "task_id", "expected a UUID"),
    ({"session_id": 5}, "session_id", "expected a string"),
    ({"workload": "chat"}, "workload", "expected one of completion, embedding, rerank"),
    ({"engine": "ollama"}, "engine", "expected one of llamacpp, vllm, tgi, triton"),
    ({"ctx": -1}, "ctx", "expected an integer >= 0"),
    ({"ctx": "512"}, "ctx", "expected an integer, got str"),
    ({"ctx": True}, "ctx", "expected an integer, got bool"),
    ({"priority": "urgent"}, "priority", "expected one of interactive, batch"),
    ({"max_tokens": 0}, "max_tokens", "expected an integer >= 1"),
    ({"max_tokens": 2**40}, "max_tokens", "expected an integer <="),
    ({"deadline_ms": 1.5}, "deadline_ms", "expected an integer, got float"),
    ({"model_ref": ""}, "model_ref", "must not be empty"),
    ({"determinism": "exact"}, "determinism", "expected one of strict, best_effort"),
    ({"kv_hint": "warm"}, "kv_hint", "expected one of reuse, cold"),
    ({"inputs": ["a", 1]}, "inputs", "expected a list of strings"),
    ({"prompt": ...}, "prompt", "is required for workload 'completion'"),
    ({"placement": []}, "placement", "expected an object"),
    ({"placement": {"mode": "pin"}}, "placement.pin_pool_id", "is required when placement.mode is 'pin'"),
    ({"placement": {"mode": "nearest"}}, "placement.mode", "expected one of pin, prefer, auto"),
    ({"placement": {"allow_fallback": "no"}}, "placement.allow_fallback", "expected true or false"),
    ({"placement": {"prefer_pools": "pool-0"}}, "placement.prefer_pools", "expected a list of strings"),
])
def test_each_bad_field_is_named(change, field, message):
    with pytest.raises(WireError) as err:
        parse_task_request(body(**change))
    assert err.value.field == field and message in str(err.value) and str(err.value).startswith(field + ":")


def test_not_an_object():
    with pytest.raises(WireError, match="body: expected a JSON object"):
        parse_task_request(["task"])
