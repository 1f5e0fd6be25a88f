"""POST /v2/tasks bodies: every field validated, the error names it, unknown fields ignored."""

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


CANONICAL = "0f8fad5b-d9cb-469f-a165-70867728950e"


@pytest.mark.parametrize("field", ["task_id", "session_id"])
@pytest.mark.parametrize("spelling", [CANONICAL.upper(), "{" + CANONICAL + "}", "urn:uuid:" + CANONICAL,
                                      CANONICAL.replace("-", "")])
def test_another_spelling_of_a_uuid_is_refused_naming_the_canonical_one(field, spelling):
    # The id is what later requests (events, cancel, sessions) must match: accepting another
    # spelling and storing the canonical one left the task unreachable under the client's id.
    with pytest.raises(WireError) as err:
        parse_task_request(body(**{field: spelling}))
    assert err.value.field == field and "canonical" in str(err.value) and repr(CANONICAL) in str(err.value)


def test_a_canonical_uuid_is_kept_as_sent():
    spec, _ = parse_task_request(body(task_id=CANONICAL, session_id=CANONICAL))
    assert spec.task_id == CANONICAL and spec.session_id == CANONICAL


@pytest.mark.parametrize("ctx, max_tokens, ok", [(16, 100_000, False), (16, 17, False), (16, 16, True),
                                                 (0, 1, False), (512, 32, True)])
def test_max_tokens_must_fit_in_ctx(ctx, max_tokens, ok):
    if ok:
        spec, _ = parse_task_request(body(ctx=ctx, max_tokens=max_tokens))
        assert (spec.ctx, spec.max_tokens) == (ctx, max_tokens)
        return
    with pytest.raises(WireError) as err:
        parse_task_request(body(ctx=ctx, max_tokens=max_tokens))
    assert err.value.field == "max_tokens" and f"ctx {ctx}" in str(err.value)


# -- fuzzing: any JSON in any field is a WireError or a task, never another exception ----------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
FIELDS = ["task_id", "session_id", "workload", "model_ref", "engine", "ctx", "priority", "max_tokens", "deadline_ms",
          "seed", "determinism", "sampler_profile_version", "prompt", "inputs", "expected_tokens", "kv_hint",
          "placement"]
PLACEMENT_FIELDS = ["mode", "pin_pool_id", "prefer_pools", "avoid_pools", "require_device_mask", "allow_fallback"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(FIELDS), json_values, min_size=1, max_size=4),
       placement=st.one_of(st.none(), st.dictionaries(st.sampled_from(PLACEMENT_FIELDS), json_values, max_size=3)))
def test_any_json_in_any_field_is_a_named_400_or_a_task(changes, placement):
    request = body(**changes)
    if placement is not None:
        request["placement"] = placement
    try:
        spec, _ = parse_task_request(request)
    except WireError as exc:
        assert str(exc).startswith(exc.field + ":") and exc.field.split(".")[0] in FIELDS + ["body"]
        return
    assert spec.max_tokens <= spec.ctx


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_any_json_body_is_a_400_or_a_task(value):
    try:
        parse_task_request(value)
    except WireError:
        pass
