"""The client wire format of ``POST /v2/tasks``: JSON in, a validated ``TaskSpec`` out.

Every field of the contract is checked here, at the edge, and a bad one becomes a 400 whose
message names the field and what was expected (``WireError``). Unknown fields are ignored.
What the core does not need for its decisions (prompt, inputs, seed, kv hint) travels beside
the spec in ``TaskPayload`` for the adapter that talks to the engine.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from ...core.types import (
    DEFAULT_PLACEMENT,
    Determinism,
    PlacementMode,
    PlacementRequest,
    Priority,
    TaskSpec,
)

WORKLOADS = ("completion", "embedding", "rerank")
ENGINES = ("llamacpp", "vllm", "tgi", "triton")
KV_HINTS = ("reuse", "cold")
MAX_INT = 2**31 - 1


class WireError(ValueError):
    """A client error: ``field`` names the offending field (dotted for nested ones)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskPayload:
    prompt: str | None
    inputs: tuple[str, ...]
    seed: int | None
    kv_hint: str | None
    messages: tuple[dict, ...] | None = None  # chat turns (OpenAI front door); the adapter renders them
    sampling: tuple[tuple[str, Any], ...] = ()  # validated sampler settings (``parse_sampling``), for the engine


#: Sampler settings an engine is given when a client sets them: name -> (kind, low, high).
SAMPLING = {
    "temperature": ("number", 0.0, 2.0), "top_p": ("number", 0.0, 1.0), "min_p": ("number", 0.0, 1.0),
    "top_k": ("integer", 0, 1_000_000), "presence_penalty": ("number", -2.0, 2.0),
    "frequency_penalty": ("number", -2.0, 2.0), "repeat_penalty": ("number", 0.0, 10.0),
}
MAX_STOP_SEQUENCES = 4


def parse_sampling(body: dict, prefix: str = "") -> tuple[tuple[str, Any], ...]:
    """The sampler settings present in ``body`` (OpenAI names), range-checked; ``stop`` as a tuple."""
    out: list[tuple[str, Any]] = []
    for name, (kind, low, high) in SAMPLING.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "integer" and not isinstance(value, int)):
            raise WireError(prefix + name, f"expected {'an integer' if kind == 'integer' else 'a number'}, got {value!r}")
        if not low <= value <= high:
            raise WireError(prefix + name, f"expected a value in [{low:g}, {high:g}], got {value!r}")
        out.append((name, value))
    stop = body.get("stop")
    if stop is not None:
        stops = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
            raise WireError(prefix + "stop", "expected a non-empty string or a list of them")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise WireError(prefix + "stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if stops:
            out.append(("stop", tuple(stops)))
    return tuple(out)


_MISSING = object()


def _get(body: dict, name: str, required: bool) -> Any:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise WireError(name, "is required")
        return _MISSING
    return value


def _int(body: dict, name: str, *, required: bool, minimum: int | None = None, prefix: str = "") -> int | None:
    value = _get(body, name, required)
    if value is _MISSING:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(prefix + name, f"expected an integer, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise WireError(prefix + name, f"expected an integer >= {minimum}, got {value}")
    if value > MAX_INT:
        raise WireError(prefix + name, f"expected an integer <= {MAX_INT}, got {value}")
    return value


def _str(body: dict, name: str, *, required: bool, choices: tuple[str, ...] | None = None, prefix: str = "") -> str | None:
    value = _get(body, name, required)
    if value is _MISSING:
        return None
    if not isinstance(value, str):
        raise WireError(prefix + name, f"expected a string, got {type(value).__name__}")
    if choices is not None and value not in choices:
        raise WireError(prefix + name, f"expected one of {', '.join(choices)}; got {value!r}")
    if choices is None and required and not value.strip():
        raise WireError(prefix + name, "must not be empty")
    return value


def _uuid(body: dict, name: str) -> str:
    """A UUID in its canonical spelling only: the id is the key the client's later requests (events,
    cancel, sessions) must match, so another spelling of the same UUID is refused, not rewritten."""
    value = _str(body, name, required=True)
    try:
        canonical = str(uuid.UUID(value))
    except ValueError:
        raise WireError(name, f"expected a UUID, got {value!r}") from None
    if value != canonical:
        raise WireError(name, f"expected a UUID in canonical form (lowercase, hyphenated 8-4-4-4-12): write "
                              f"{canonical!r}, not {value!r}")
    return value


def _str_list(body: dict, name: str, *, prefix: str = "") -> tuple[str, ...]:
    value = _get(body, name, False)
    if value is _MISSING:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise WireError(prefix + name, "expected a list of strings")
    return tuple(value)


def _bool(body: dict, name: str, default: bool, *, prefix: str = "") -> bool:
    value = _get(body, name, False)
    if value is _MISSING:
        return default
    if not isinstance(value, bool):
        raise WireError(prefix + name, f"expected true or false, got {value!r}")
    return value


def _placement(body: dict) -> PlacementRequest:
    raw = _get(body, "placement", False)
    if raw is _MISSING:
        return DEFAULT_PLACEMENT  # frozen: one shared instance, not one per task
    if not isinstance(raw, dict):
        raise WireError("placement", "expected an object")
    p = "placement."
    mode = PlacementMode(_str(raw, "mode", required=False, choices=("pin", "prefer", "auto"), prefix=p) or "auto")
    pin = _str(raw, "pin_pool_id", required=False, prefix=p)
    if mode is PlacementMode.PIN and not pin:
        raise WireError("placement.pin_pool_id", "is required when placement.mode is 'pin'")
    return PlacementRequest(
        mode=mode, pin_pool_id=pin, prefer_pools=_str_list(raw, "prefer_pools", prefix=p),
        avoid_pools=_str_list(raw, "avoid_pools", prefix=p),
        require_device_mask=_str(raw, "require_device_mask", required=False, prefix=p),
        allow_fallback=_bool(raw, "allow_fallback", True, prefix=p))


def parse_task_request(body: object) -> tuple[TaskSpec, TaskPayload]:
    """Validate a ``POST /v2/tasks`` body; raise ``WireError`` naming the first bad field."""
    if not isinstance(body, dict):
        raise WireError("body", "expected a JSON object")
    task_id = _uuid(body, "task_id")
    session_id = _uuid(body, "session_id")
    workload = _str(body, "workload", required=True, choices=WORKLOADS)
    model_ref = _str(body, "model_ref", required=True)
    engine = _str(body, "engine", required=True, choices=ENGINES)
    ctx = _int(body, "ctx", required=True, minimum=0)
    priority = Priority(_str(body, "priority", required=True, choices=("interactive", "batch")))
    max_tokens = _int(body, "max_tokens", required=True, minimum=1)
    deadline_ms = _int(body, "deadline_ms", required=True)  # <= 0 is DEADLINE_UNMET, decided by admission
    seed = _int(body, "seed", required=False, minimum=0)
    determinism = Determinism(_str(body, "determinism", required=False, choices=("strict", "best_effort"))
                              or "best_effort")
    sampler = _str(body, "sampler_profile_version", required=False)
    prompt = _str(body, "prompt", required=False)
    inputs = _str_list(body, "inputs")
    expected = _int(body, "expected_tokens", required=False, minimum=0)
    kv_hint = _str(body, "kv_hint", required=False, choices=KV_HINTS)
    placement = _placement(body)
    if max_tokens > ctx:
        raise WireError("max_tokens", f"{max_tokens} does not fit in ctx {ctx}: the prompt and the tokens to "
                                      f"generate share the context, so max_tokens must be at most ctx")
    if workload == "completion" and prompt is None and not inputs:
        raise WireError("prompt", "is required for workload 'completion' (or give inputs[])")
    text = prompt if prompt is not None else " ".join(inputs)
    spec = TaskSpec(
        task_id=task_id, session_id=session_id, model_ref=model_ref, priority=priority, engine=engine,
        workload=workload, ctx=ctx, max_tokens=max_tokens, deadline_ms=deadline_ms,
        prompt_tokens=len(text.encode()) // 4, expected_tokens=expected, seed=seed, determinism=determinism,
        sampler_profile_version=sampler, placement=placement)
    return spec, TaskPayload(prompt=prompt, inputs=inputs, seed=seed, kv_hint=kv_hint)
