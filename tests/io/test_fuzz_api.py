"""Schema-driven fuzzing of both daemons with schemathesis, against their own served OpenAPI documents.

A live cluster on real sockets: two mock engines (llama-server's protocol), a pool-managerd watching
their handoffs, an orchestratord polling it, all on one event loop in a thread of this process.
schemathesis generates requests for every documented operation (valid ones and ones that break
the schema), sends them over HTTP and checks each answer: never a 5xx that the document does not
list, the status, content type, headers and body as documented. Bounded and repeatable: a fixed
seed (``derandomize``) and a fixed number of examples per operation.

Operations that would take the cluster's pools away (drain, reload, undrain; node deregistration)
only ever see the pools made for that purpose: the generated pool ids are steered to ``sacrifice-*``
pools or to ones that do not exist, so the rest of the run still has ``pool-0`` to place tasks on.
"""

from __future__ import annotations

import asyncio
import os
import urllib.request
import uuid
import zlib

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, rule, run_state_machine_as_test
from live_cluster import MODEL, LiveCluster
from schemathesis import checks as sc

from llama_orch.io.openapi_doc import document
from llama_orch.io.orchestratord.driver import DRIVER
from llama_orch.io.orchestratord.nodes import NODES

EXAMPLES = int(os.environ.get("LLAMA_ORCH_FUZZ_EXAMPLES", "60"))  # per operation and mode: about 30 s in all


def no_internal_error(ctx, response, case) -> None:
    """A 500 is always a defect. Other 5xx are answers (503 when no pool can take a task, with
    Retry-After): those must be documented for the operation, which status_code_conformance checks."""
    if response.status_code == 500:
        raise AssertionError(f"500 from {case.operation.label}: {response.text[:300]}")


CHECKS = [no_internal_error, sc.status_code_conformance, sc.content_type_conformance,
          sc.response_headers_conformance, sc.response_schema_conformance]
DESTRUCTIVE = ("/drain", "/reload", "/undrain")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    cluster = LiveCluster(tmp_path_factory.mktemp("fuzz")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _steer(case, live: LiveCluster) -> None:
    """Keep the generated requests inside this sandbox and aimed at something real.

    - Destructive operations only ever touch pools made for it (or none that exist).
    - A node registers with a loopback address only: orchestratord polls what registers, and no
      request may leave this machine.
    - Every other task or completion names the served model with sizes that fit, so that half
      the generated requests are admitted and streamed rather than refused at the door (each
      field's own refusals are fuzzed in test_wire and test_openai_api).
    """
    path, body = case.operation.path, case.body
    path_parameters = case.path_parameters or {}
    if path.endswith(DESTRUCTIVE) and path_parameters.get("pool_id") == "pool-0":
        path_parameters["pool_id"] = "sacrifice-0"
    if not isinstance(body, dict):
        return
    if path == "/v2/nodes/register" and "base_url" in body:
        body["base_url"] = live.urls["pool-managerd"]
    elif path == "/callbacks/pool-ready":
        body.pop("status_url", None)
    steer = zlib.crc32(repr(sorted(body.items(), key=repr)).encode()) % 2 == 0  # repeatable, unlike hash()
    if path == "/v2/tasks" and steer:
        body.update(model_ref=MODEL, engine="llamacpp", workload="completion", ctx=256, deadline_ms=30_000)
        if not isinstance(body.get("max_tokens"), int) or not 1 <= body["max_tokens"] <= 64:
            body["max_tokens"] = 16
    elif path in ("/v1/chat/completions", "/v1/completions") and steer:
        body["model"] = MODEL
        body["max_tokens"] = 16
        body.pop("max_completion_tokens", None)


def _operations(name: str) -> dict:
    """Each documented operation of a daemon, by label: the document is the one it serves."""
    schema = schemathesis.openapi.from_dict(document(name))
    return {op.label: op for op in (result.ok() for result in schema.get_all_operations())}


OPERATIONS = {"orchestratord": _operations("orchestratord"), "pool-managerd": _operations("pool_managerd")}
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def _can_be_invalid(operation) -> bool:
    """A body, or a parameter with a constraint: something a request can get wrong (negative
    generation has nothing to break in ``GET /livez``, or in a path segment that takes any string)."""
    raw = operation.definition.raw
    params = raw.get("parameters", [])
    return "requestBody" in raw or any(set(p.get("schema", {})) - {"type"} or p.get("schema", {}).get("type") != "string"
                                       for p in params)


CASES = [pytest.param(d, label, mode, id=f"{d}-{label}-{'valid' if mode is schemathesis.GenerationMode.POSITIVE else 'invalid'}")
         for d, ops in OPERATIONS.items() for label, op in ops.items()
         for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
         if mode is schemathesis.GenerationMode.POSITIVE or _can_be_invalid(op)]


@pytest.mark.parametrize("daemon, label, mode", CASES)
def test_every_operation_answers_as_documented(live, daemon, label, mode):
    operation = OPERATIONS[daemon][label]

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case):
        _steer(case, live)
        case.call_and_validate(base_url=live.urls[daemon], checks=CHECKS, timeout=30)

    fuzz()


def test_linked_operations_in_sequence_answer_as_documented(live):
    """Stateful: schemathesis follows the document's links in random sequences (a node registered,
    then its heartbeat and deregistration, by the id just made), every answer checked as above.
    Each sequence starts from a clean slate (no node, no task), so sequences repeat exactly.

    Only the document's own links are followed (schemathesis's inferred ones pair operations by
    what the live server holds at the time, which differs between runs). It does not start at
    ``POST /v2/tasks``: its analysis takes ``session_id`` for a reference to a resource nothing
    creates, so the task links (events, cancel, session) are not walked here."""
    config = schemathesis.Config.from_dict({"phases": {"stateful": {"inference": {"algorithms": []}}}})
    schema = schemathesis.openapi.from_url(f"{live.urls['orchestratord']}/openapi.json", config=config)
    app = next(runner.app for runner in live.runners if DRIVER in runner.app)
    calls: list[str] = []

    async def clean_slate() -> None:
        app[DRIVER].cancel_all("client")
        for node in list(app[NODES].nodes.all()):
            app[NODES].deregister(node.node_id)

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            asyncio.run_coroutine_threadsafe(clean_slate(), live.loop).result(10)

        def before_call(self, case) -> None:
            _steer(case, live)

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            calls.append(f"{case.operation.label} {response.status_code}")
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    Machine.run(settings=settings(max_examples=max(10, EXAMPLES // 2), stateful_step_count=6, derandomize=True,
                                  deadline=None, database=None, suppress_health_check=list(HealthCheck)))
    # the links were followed with the ids the previous answers gave
    assert "POST /v2/nodes/{node_id}/heartbeat 200" in calls, sorted(set(calls))
    assert "DELETE /v2/nodes/{node_id} 204" in calls, sorted(set(calls))


class TaskLifecycle(RuleBasedStateMachine):
    """Stateful, the task links the document declares: tasks admitted, then their events,
    cancel, session and the session's deletion, in any order and any number, every answer
    checked as above. The ids are the machine's own (not read back from the server), so each
    sequence replays exactly whatever the live server answers; the cluster is emptied between
    sequences."""

    live: LiveCluster  # set by the test
    calls: list[str] = []  # "label status" of every call, for the test's coverage check
    operations = OPERATIONS["orchestratord"]
    tasks = Bundle("tasks")

    def __init__(self) -> None:
        super().__init__()
        app = next(runner.app for runner in self.live.runners if DRIVER in runner.app)

        async def clean_slate() -> None:
            app[DRIVER].cancel_all("client")

        asyncio.run_coroutine_threadsafe(clean_slate(), self.live.loop).result(10)

    def _call(self, label: str, **parts) -> int:
        case = self.operations[label].Case(**parts)
        response = case.call_and_validate(base_url=self.live.urls["orchestratord"], checks=CHECKS, timeout=30)
        self.calls.append(f"{label} {response.status_code}")
        return response.status_code

    @rule(target=tasks, n=st.integers(0, 2**32), max_tokens=st.integers(1, 64), shared=st.booleans(),
          priority=st.sampled_from(["interactive", "batch"]))
    def create(self, n, max_tokens, shared, priority):
        session = str(uuid.UUID(int=7 if shared else n + 1, version=4))
        body = {"task_id": str(uuid.UUID(int=n, version=4)), "session_id": session, "workload": "completion",
                "model_ref": MODEL, "engine": "llamacpp", "ctx": 256, "priority": priority,
                "max_tokens": max_tokens, "deadline_ms": 30_000, "prompt": "hello"}
        status = self._call("POST /v2/tasks", body=body, media_type="application/json")
        return body["task_id"], session, status

    @rule(task=tasks)
    def events(self, task):
        self._call("GET /v2/tasks/{task_id}/events", path_parameters={"task_id": task[0]})

    @rule(task=tasks)
    def cancel(self, task):
        self._call("POST /v2/tasks/{task_id}/cancel", path_parameters={"task_id": task[0]})

    @rule(task=tasks)
    def session(self, task):
        self._call("GET /v2/sessions/{session_id}", path_parameters={"session_id": task[1]})

    @rule(task=tasks)
    def forget_session(self, task):
        self._call("DELETE /v2/sessions/{session_id}", path_parameters={"session_id": task[1]})


def test_task_links_in_sequence_answer_as_documented(live):
    TaskLifecycle.live, TaskLifecycle.calls = live, []
    run_state_machine_as_test(TaskLifecycle, settings=settings(
        max_examples=max(10, EXAMPLES // 2), stateful_step_count=10, derandomize=True, deadline=None,
        database=None, suppress_health_check=list(HealthCheck)))
    seen = set(TaskLifecycle.calls)
    for expected in ("POST /v2/tasks 202", "GET /v2/tasks/{task_id}/events 200", "POST /v2/tasks/{task_id}/cancel 204",
                     "GET /v2/sessions/{session_id} 200", "DELETE /v2/sessions/{session_id} 204"):
        assert expected in seen, (expected, sorted(seen))


def test_the_cluster_still_serves_after_the_fuzzing(live):
    """Last in this module (tests run in file order): the fuzzing left pool-0 usable."""
    import json

    with urllib.request.urlopen(f"{live.urls['orchestratord']}/v2/pools", timeout=5) as r:
        pools = {p["pool_id"]: p for p in json.loads(r.read())["pools"]}
    assert pools["pool-0"]["ready"], pools
