"""The OpenAPI 3.1 documents of both daemons: valid, in step with the routes, true to real answers.

Each document must (1) be a valid OpenAPI 3.1 document, (2) list exactly the routes its
``create_app`` registers (orchestratord may document a few endpoints before they exist: the
explicit ``PENDING`` set, which must shrink as they land), (3) accept the requests and responses
the daemons really exchange: real requests through the in-process apps of
``test_orchestratord``/``test_pool_managerd`` (mock engines on loopback), every exchange checked
by openapi-core, SSE event data checked against the document's ``x-sse-events`` schemas, and
(4) be what ``GET /openapi.json`` serves.
"""

from __future__ import annotations

import importlib.util
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict, MultiDict
from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.deserializing.media_types.util import plain_loads
from openapi_core.exceptions import OpenAPIError
from openapi_schema_validator import OAS31Validator, oas31_format_checker
from openapi_spec_validator import OpenAPIV31SpecValidator
from support import eventually

from llama_orch import __version__
from llama_orch.core.admission import QueuePolicy
from llama_orch.core.orchestrator import OrchestratorConfig
from llama_orch.core.sessions import BudgetPolicy
from llama_orch.ext.sse import SSEParser
from llama_orch.io.handoff import Handoff, write_handoff
from llama_orch.io.openapi_doc import DOCUMENTS, add_openapi_route, document
from llama_orch.io.orchestratord import app as orchestratord
from llama_orch.io.pool_managerd import manager as pool_managerd


def _sibling(relative: str):
    """Another test module under tests/io, for its builders: tests/io is no package (it would
    shadow the stdlib ``io``), so it is loaded from its file rather than imported."""
    name = Path(relative).name
    spec = importlib.util.spec_from_file_location(f"_openapi_{name}", Path(__file__).parent / f"{relative}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


orchd_tests = _sibling("orchestratord/test_orchestratord")
pmd_tests = _sibling("pool_managerd/test_pool_managerd")
task = orchd_tests.task

# Endpoints documented before they are routed (say, while a front door is being built). An entry
# only excuses "documented but not routed"; test_pending_endpoints_are_still_pending asks for the
# clean-up once it lands. Empty now: every documented endpoint exists.
PENDING: set[tuple[str, str]] = set()
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _has_route(app: web.Application, path: str) -> bool:
    return any(r.resource is not None and r.resource.canonical == path for r in app.router.routes())


def with_openapi(app: web.Application, name: str) -> web.Application:
    """The app with its /openapi.json route, whether or not its create_app wires it yet."""
    if not _has_route(app, "/openapi.json"):
        add_openapi_route(app, name)
    return app


def orchd_app(**cfg) -> web.Application:
    """orchestratord as create_app builds it (plus /openapi.json): what the route tests compare."""
    return with_openapi(orchestratord.create_app(OrchestratorConfig(**cfg), [], poll_interval_ms=50), "orchestratord")


def pmd_app(tmp_path: Path, **kw) -> web.Application:
    return with_openapi(pool_managerd.create_app(pmd_tests.settings(tmp_path, **kw)), "pool_managerd")


# -- openapi-core adapters and the checking client --------------------------------------------


@dataclass
class Req:
    """openapi-core's Request protocol, built from what the test client sent."""

    method: str
    path: str
    parameters: RequestParameters
    body: bytes | None = None
    content_type: str = ""
    host_url: str = "http://127.0.0.1"


@dataclass
class Resp:
    """openapi-core's Response protocol, built from what came back (the body read in full)."""

    status_code: int
    headers: Mapping[str, str]
    data: bytes
    content_type: str = ""


def first_event(raw: bytes | str) -> dict:
    """The first event of an SSE body as the document's ``SseEvent``: its fields by name."""
    text = plain_loads(raw) if isinstance(raw, bytes) else raw
    block = text.split("\n\n", 1)[0]
    fields: dict[str, str] = {}
    for line in block.split("\n"):
        name, _, value = line.partition(":")
        if name in ("event", "data", "id"):
            fields[name] = fields.get(name, "") + ("\n" if name == "data" and name in fields else "") + value.lstrip(" ")
    return fields


class Contract:
    """One daemon's document, and checks of exchanges against it."""

    # The document's text/event-stream schema is one event (as OpenAPI 3.1 tools read it):
    # openapi-core checks the first one; every event's data is checked against x-sse-events below.
    CONFIG = Config(extra_media_type_deserializers={"text/event-stream": first_event})

    def __init__(self, name: str) -> None:
        self.doc = document(name)
        self.openapi = OpenAPI.from_dict(self.doc, config=self.CONFIG)
        self._templates = [(re.compile("^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(t)) + "$"), t)
                           for t in self.doc["paths"]]

    def check(self, req: Req, resp: Resp, *, valid_request: bool = True) -> None:
        """Raise an openapi-core error naming what does not match.

        A request meant to be refused (a missing field, a bad type) is not one the document
        accepts, so only its response is held to the document.
        """
        if valid_request:
            self.openapi.validate_request(req)
        self.openapi.validate_response(req, resp)

    def template(self, path: str) -> str:
        matches = [t for pattern, t in self._templates if pattern.match(path)]
        assert matches, f"{path} matches no documented path"
        return min(matches, key=lambda t: t.count("{"))  # /v2/nodes/register before /v2/nodes/{node_id}

    def check_events(self, method: str, path: str, status: int, events: list[tuple[str, str]]) -> None:
        """Each SSE event's data against the ``x-sse-events`` schema of its name; an event the
        document does not name fails, and so does any data after the ``x-sse-done`` sentinel."""
        media = self.doc["paths"][self.template(path)][method.lower()]["responses"][str(status)]["content"][
            "text/event-stream"]
        schemas, done = media["x-sse-events"], media.get("x-sse-done")
        for n, (name, raw) in enumerate(events):
            if done is not None and raw == done:
                assert n == len(events) - 1, f"events after {done}: {events[n + 1:]}"
                continue
            assert name in schemas, f"event {name!r} is not documented for {method} {path}"
            self.check_event(schemas[name], orjson.loads(raw))

    def check_event(self, schema: dict, data: object) -> None:
        # The refs point into this document: validate against a root that carries its components.
        root = {**schema, "components": self.doc["components"]}
        OAS31Validator(root, format_checker=oas31_format_checker).validate(data)

    def sse_schema(self, path: str, event: str) -> dict:
        media = self.doc["paths"][path]["get"]["responses"]["200"]["content"]["text/event-stream"]
        return media["x-sse-events"][event]


@dataclass
class Exchange:
    status: int
    headers: CIMultiDict
    body: bytes
    events: list[tuple[str, Any]] = field(default_factory=list)  # (name, data); the sentinel stays a string

    def json(self) -> Any:
        return orjson.loads(self.body)


class Checked:
    """An aiohttp test client whose every exchange is checked against the daemon's document."""

    def __init__(self, client, contract: Contract) -> None:
        self.client = client
        self.contract = contract

    async def call(self, method: str, path: str, *, json: object = None, data: bytes | None = None,
                   params: dict | None = None, headers: dict | None = None, valid_request: bool = True) -> Exchange:
        headers = dict(headers or {})
        if json is not None:
            data = orjson.dumps(json)
        if data is not None:
            headers.setdefault("Content-Type", "application/json")
        async with self.client.request(method, path, data=data, params=params, headers=headers) as resp:
            body = await resp.read()  # an SSE stream ends after its terminal event
            ex = Exchange(resp.status, CIMultiDict(resp.headers), body)
        sent = CIMultiDict(headers)
        req = Req(method.lower(), path, RequestParameters(query=MultiDict(params or {}), header=sent),
                  body=data, content_type=sent.get("Content-Type", ""))
        got = Resp(ex.status, ex.headers, body, ex.headers.get("Content-Type", ""))
        self.contract.check(req, got, valid_request=valid_request)
        if ex.headers.get("Content-Type", "").startswith("text/event-stream"):
            raw = [(name, data.decode()) for name, data in SSEParser().feed(body)]
            self.contract.check_events(method, path, ex.status, raw)
            ex.events = [(name, data if data == "[DONE]" else orjson.loads(data)) for name, data in raw]
        return ex

    async def get(self, path: str, **kw) -> Exchange:
        return await self.call("GET", path, **kw)

    async def post(self, path: str, **kw) -> Exchange:
        return await self.call("POST", path, **kw)

    async def delete(self, path: str, **kw) -> Exchange:
        return await self.call("DELETE", path, **kw)

    async def events(self, task_id: str, **kw) -> list[tuple[str, Any]]:
        """A task's whole event stream (each event checked by ``call``)."""
        ex = await self.get(f"/v2/tasks/{task_id}/events", **kw)
        assert ex.status == 200, ex.body
        return ex.events


ORCHD = Contract("orchestratord")
PMD = Contract("pool_managerd")


# -- (1) valid documents ----------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCUMENTS)
def test_the_document_is_valid_openapi_3_1(name):
    doc = document(name)
    assert doc["openapi"].startswith("3.1.")
    OpenAPIV31SpecValidator(doc).validate()  # raises, naming the first problem


def test_every_operation_has_an_id_and_every_schema_ref_resolves():
    for name in DOCUMENTS:
        doc = document(name)
        ids = [op["operationId"] for item in doc["paths"].values() for m, op in item.items() if m in METHODS]
        assert len(ids) == len(set(ids)), f"{name}: duplicate operationId"
        for r in set(_refs(doc)):
            node: Any = doc
            for part in r.removeprefix("#/").split("/"):
                assert part in node, f"{name}: unresolved {r}"
                node = node[part]


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


# -- (2) documents and routes in step ---------------------------------------------------------


def routes(app: web.Application) -> set[tuple[str, str]]:
    # aiohttp adds a HEAD route beside every GET: not an endpoint of its own
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}


def documented(doc: dict) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in doc["paths"].items() for m in item if m in METHODS}


async def test_every_route_of_each_app_is_documented(tmp_path):
    for app, doc in ((orchd_app(), ORCHD.doc), (pmd_app(tmp_path), PMD.doc)):
        missing = routes(app) - documented(doc)
        assert not missing, f"{doc['info']['title']}: routes without documentation: {sorted(missing)}"


async def test_every_documented_endpoint_exists(tmp_path):
    orchd_missing = documented(ORCHD.doc) - routes(orchd_app())
    assert orchd_missing <= PENDING, f"orchestratord documents endpoints it lacks: {sorted(orchd_missing - PENDING)}"
    pmd_missing = documented(PMD.doc) - routes(pmd_app(tmp_path))
    assert not pmd_missing, f"pool-managerd documents endpoints it lacks: {sorted(pmd_missing)}"


async def test_pending_endpoints_are_still_pending():
    landed = PENDING & routes(orchd_app())
    assert not landed, (f"these endpoints now exist: remove them from PENDING in {Path(__file__).name} and add "
                        f"exchanges for them to the response tests: {sorted(landed)}")


# -- the checker can fail ---------------------------------------------------------------------


def _version_exchange(body: bytes, headers: dict | None = None) -> tuple[Req, Resp]:
    req = Req("get", "/v2/meta/version", RequestParameters(query=MultiDict(), header=CIMultiDict()))
    hdrs = CIMultiDict({"Content-Type": "application/json", "X-Correlation-Id": "c-1"} if headers is None else headers)
    return req, Resp(200, hdrs, body, hdrs.get("Content-Type", ""))


def test_the_checker_rejects_what_the_document_does_not_allow():
    ORCHD.check(*_version_exchange(b'{"version": "0.1.0", "api_version": "v2"}'))  # the baseline passes
    with pytest.raises(OpenAPIError):  # a field of the wrong type
        ORCHD.check(*_version_exchange(b'{"version": 1, "api_version": "v2"}'))
    with pytest.raises(OpenAPIError):  # a required field missing
        ORCHD.check(*_version_exchange(b'{"api_version": "v2"}'))
    with pytest.raises(OpenAPIError):  # a required header missing
        ORCHD.check(*_version_exchange(b'{"version": "0.1.0", "api_version": "v2"}',
                                       {"Content-Type": "application/json"}))
    req, resp = _version_exchange(b"{}")
    with pytest.raises(OpenAPIError):  # an undocumented status
        ORCHD.check(req, Resp(418, resp.headers, resp.data, resp.content_type))
    events = "/v2/tasks/{task_id}/events"
    with pytest.raises(Exception, match="is not of type 'integer'"):  # SSE event data
        ORCHD.check_event(ORCHD.sse_schema(events, "token"), {"t": "x", "i": "0"})
    with pytest.raises(AssertionError, match="not documented"):  # an SSE event the document does not name
        ORCHD.check_events("GET", f"/v2/tasks/{uuid.uuid4()}/events", 200, [("surprise", "{}")])
    bad_task = Req("post", "/v2/tasks", RequestParameters(query=MultiDict(), header=CIMultiDict()),
                   body=orjson.dumps(task(ctx="big")), content_type="application/json")
    with pytest.raises(OpenAPIError):  # a request the daemon refuses is one the document refuses
        ORCHD.openapi.validate_request(bad_task)


# -- (3) real exchanges, orchestratord --------------------------------------------------------


async def cluster(aiohttp_server, aiohttp_client, tmp_path, **kw) -> Checked:
    return Checked(await orchd_tests.cluster(aiohttp_server, aiohttp_client, tmp_path, **kw), ORCHD)


async def test_a_task_its_stream_and_its_session_match_the_document(aiohttp_server, aiohttp_client, tmp_path):
    budgets = BudgetPolicy(tokens=1000, time_ms=600_000, cost=100.0, cost_per_1k_output_tokens=1.0)
    api = await cluster(aiohttp_server, aiohttp_client, tmp_path, tokens_per_s=100, metrics_interval_ms=20,
                        budgets=budgets)
    body = task(max_tokens=10)
    admitted = await api.post("/v2/tasks", json=body, headers={"X-Correlation-Id": "corr-7"})
    assert admitted.status == 202 and admitted.headers["X-Correlation-Id"] == "corr-7"
    assert "X-Budget-Tokens-Remaining" in admitted.headers
    events = await api.events(body["task_id"], params={"verbose": "true"})
    kinds = [k for k, _ in events]
    assert {"started", "token", "metrics", "narration", "end"} <= set(kinds) and kinds[-1] == "end"
    assert (await api.post(f"/v2/tasks/{body['task_id']}/cancel")).status == 204  # finished: still 204
    sid = body["session_id"]
    session = await api.get(f"/v2/sessions/{sid}")
    assert session.status == 200 and session.json()["tokens_used"] == 10
    assert (await api.delete(f"/v2/sessions/{sid}")).status == 204
    assert (await api.get(f"/v2/sessions/{sid}")).status == 404
    assert (await api.delete(f"/v2/sessions/{sid}")).status == 404
    unknown = str(uuid.uuid4())
    assert (await api.get(f"/v2/tasks/{unknown}/events")).status == 404
    assert (await api.post(f"/v2/tasks/{unknown}/cancel")).status == 404


async def test_a_canceled_stream_matches_the_document(aiohttp_server, aiohttp_client, tmp_path):
    api = await cluster(aiohttp_server, aiohttp_client, tmp_path, slots=1, tokens_per_s=20)
    running, queued = task(max_tokens=200), task(max_tokens=200)
    assert (await api.post("/v2/tasks", json=running)).status == 202
    assert (await api.post("/v2/tasks", json=queued)).json()["predicted_start_ms"] > 0  # behind the running one
    for t in (queued, running):
        assert (await api.post(f"/v2/tasks/{t['task_id']}/cancel")).status == 204
    events = await api.events(queued["task_id"])
    assert events == [("end", {"tokens_out": 0, "decode_ms": 0, "decode_time_ms": 0, "canceled": True,
                               "reason": "client"})]
    assert (await api.events(running["task_id"]))[-1][1]["canceled"] is True


async def test_refused_submissions_match_the_document(aiohttp_server, aiohttp_client, tmp_path):
    api = await cluster(aiohttp_server, aiohttp_client, tmp_path)
    body = task()
    del body["ctx"]
    missing = await api.post("/v2/tasks", json=body, valid_request=False)
    assert missing.status == 400 and missing.json()["field"] == "ctx"
    wrong = await api.post("/v2/tasks", json=task(placement={"mode": "pin"}), valid_request=False)
    assert wrong.status == 400 and wrong.json()["field"] == "placement.pin_pool_id"
    late = await api.post("/v2/tasks", json=task(deadline_ms=0), valid_request=False)
    assert late.status == 400 and late.json()["code"] == "DEADLINE_UNMET"
    garbage = await api.post("/v2/tasks", data=b"{", valid_request=False)
    assert garbage.status == 400 and garbage.json()["code"] == "INVALID_PARAMS"
    unready = await api.post("/v2/tasks", json=task(model_ref="file:/models/none.gguf"))
    assert unready.status == 503 and unready.json()["code"] == "POOL_UNREADY"
    unknown_pin = await api.post("/v2/tasks", json=task(placement={"mode": "pin", "pin_pool_id": "nope"}))
    assert unknown_pin.status == 400
    first = task(max_tokens=3)
    assert (await api.post("/v2/tasks", json=first)).status == 202
    again = await api.post("/v2/tasks", json=first)
    assert again.status == 400 and "already in use" in again.json()["message"]
    await api.events(first["task_id"])


async def test_full_queues_answer_429_as_documented(aiohttp_server, aiohttp_client, tmp_path):
    api = await cluster(aiohttp_server, aiohttp_client, tmp_path, slots=1, tokens_per_s=20, admission_capacity=1,
                        admission_policy=QueuePolicy.REJECT)
    tasks = [task(max_tokens=200) for _ in range(3)]
    assert [(await api.post("/v2/tasks", json=t)).status for t in tasks[:2]] == [202, 202]
    full = await api.post("/v2/tasks", json=tasks[2])
    assert full.status == 429 and full.json()["policy_label"] == "reject" and int(full.headers["Retry-After"]) >= 1
    for t in tasks[:2]:
        await api.post(f"/v2/tasks/{t['task_id']}/cancel")


async def test_drop_lru_eviction_and_its_error_event_match_the_document(aiohttp_server, aiohttp_client, tmp_path):
    api = await cluster(aiohttp_server, aiohttp_client, tmp_path, slots=1, tokens_per_s=20, admission_capacity=1,
                        admission_policy=QueuePolicy.DROP_LRU)
    running, victim, evictor = task(max_tokens=200), task(max_tokens=200, priority="batch"), task(max_tokens=200)
    for t in (running, victim, evictor):
        assert (await api.post("/v2/tasks", json=t)).status == 202
    events = await api.events(victim["task_id"])
    assert [k for k, _ in events] == ["error"] and events[0][1]["code"] == "QUEUE_FULL_DROP_LRU"
    refused = await api.post("/v2/tasks", json=task(priority="batch"))
    assert refused.status == 429 and refused.json()["code"] == "QUEUE_FULL_DROP_LRU"
    for t in (evictor, running):
        await api.post(f"/v2/tasks/{t['task_id']}/cancel")


async def test_pools_meta_and_probes_match_the_document(aiohttp_server, aiohttp_client, tmp_path):
    api = await cluster(aiohttp_server, aiohttp_client, tmp_path)
    pools = await api.get("/v2/pools")
    assert [p["pool_id"] for p in pools.json()["pools"]] == ["pool-0"]
    assert (await api.get("/v2/pools/pool-0/health")).json()["ready"] is True
    assert (await api.get("/v2/pools/nope/health")).status == 404
    assert (await api.get("/v2/meta/capabilities")).json()["engines"]
    assert (await api.get("/v2/meta/version")).json()["version"] == __version__
    assert (await api.get("/livez")).status == 200
    assert (await api.get("/readyz")).status == 200
    metrics = await api.get("/metrics")
    assert metrics.headers["Content-Type"].startswith("text/plain") and b"tasks_enqueued_total" in metrics.body
    ack = await api.post("/callbacks/pool-ready", json={"pool_id": "pool-0", "node_id": "n"})
    assert ack.status == 202 and ack.json() == {"pool_id": "pool-0", "known": True}
    assert (await api.post("/callbacks/pool-ready", data=b"[1]", valid_request=False)).status == 400
    # drain and reload travel to pool-managerd; its answers come back through orchestratord
    assert (await api.post("/v2/pools/pool-0/reload", json={}, valid_request=False)).status == 400
    no_provisioner = await api.post("/v2/pools/pool-0/reload", json={"new_model_ref": "file:/m/other.gguf"})
    assert no_provisioner.status == 503 and no_provisioner.json()["code"] == "PROVISIONER_UNAVAILABLE"
    assert (await api.post("/v2/pools/nope/reload", json={"new_model_ref": "x"})).status == 404
    bad = await api.post("/v2/pools/pool-0/drain", json={"deadline_ms": "soon"}, valid_request=False)
    assert bad.status == 400
    assert (await api.post("/v2/pools/nope/drain", json={"deadline_ms": 10})).status == 404
    drained = await api.post("/v2/pools/pool-0/drain", json={"deadline_ms": 1000})
    assert drained.status == 202 and drained.json()["pool_id"] == "pool-0"

    async def unready():
        return not (await api.get("/v2/pools/pool-0/health")).json()["ready"]
    await eventually(unready, what="the drain seen through discovery")
    refused = await api.post("/v2/tasks", json=task())
    assert refused.status == 503 and int(refused.headers["X-Backoff-Ms"]) >= 1


async def test_an_orchestratord_without_pools_matches_the_document(aiohttp_client):
    api = Checked(await aiohttp_client(orchd_app()), ORCHD)
    assert (await api.get("/readyz")).json() == {"ready": False, "ready_pools": 0, "accepting": True}
    assert (await api.get("/readyz")).status == 503
    assert (await api.get("/v2/pools")).json() == {"pools": []}
    assert (await api.get("/v2/meta/capabilities")).json()["engines"] == []
    refused = await api.post("/v2/tasks", json=task())
    assert refused.status == 503 and refused.json()["retriable"] is True
    assert (await api.post("/v2/pools/pool-0/drain", json={})).status == 404
    assert (await api.get("/openapi.json")).status == 200


async def test_node_registration_matches_the_document(aiohttp_server, aiohttp_client, tmp_path):
    pmd = await aiohttp_server(pmd_app(tmp_path))
    api = Checked(await aiohttp_client(orchd_app()), ORCHD)
    pmd_url = str(pmd.make_url("")).rstrip("/")
    bad = await api.post("/v2/nodes/register", json={"node_id": "n1", "base_url": "ftp://x"}, valid_request=False)
    assert bad.status == 400
    assert (await api.post("/v2/nodes/n1/heartbeat")).status == 404
    registered = await api.post("/v2/nodes/register", json={"node_id": "n1", "base_url": pmd_url, "pools": []})
    assert registered.status == 200 and registered.json()["state"] == "fresh"
    assert (await api.post("/v2/nodes/n1/heartbeat", json={"pools": ["pool-0"]})).json()["pools"] == ["pool-0"]
    assert (await api.post("/v2/nodes/n1/heartbeat")).status == 200  # no body
    assert (await api.post("/v2/nodes/n1/heartbeat", json={"pools": "pool-0"}, valid_request=False)).status == 400
    assert [n["node_id"] for n in (await api.get("/v2/nodes")).json()["nodes"]] == ["n1"]
    assert (await api.delete("/v2/nodes/n1")).status == 204
    assert (await api.delete("/v2/nodes/n1")).status == 404


async def test_openai_compatible_answers_match_the_document(aiohttp_server, aiohttp_client, tmp_path):
    api = await cluster(aiohttp_server, aiohttp_client, tmp_path)
    model = orchd_tests.MODEL
    models = await api.get("/v1/models")
    assert [m["id"] for m in models.json()["data"]] == [model]
    assert (await api.get("/v1/models/nope")).status == 404
    chat = {"model": model, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "max_tokens": 4}
    answer = await api.post("/v1/chat/completions", json=chat)
    assert answer.status == 200 and answer.json()["choices"][0]["finish_reason"] == "length"
    streamed = await api.post("/v1/chat/completions", json={**chat, "stream": True,
                                                            "stream_options": {"include_usage": True}})
    assert streamed.events[-1] == ("message", "[DONE]") and streamed.events[-2][1]["usage"]["completion_tokens"] == 4
    prompt = {"model": model, "prompt": "once upon a time", "max_tokens": 3}
    assert (await api.post("/v1/completions", json=prompt)).json()["object"] == "text_completion"
    assert (await api.post("/v1/completions", json={**prompt, "stream": True})).events[-1][1] == "[DONE]"
    batch = await api.post("/v1/completions", json={**prompt, "prompt": ["a", "b"]}, valid_request=False)
    assert batch.status == 400 and batch.json()["error"]["param"] == "prompt"
    unknown = await api.post("/v1/chat/completions", json={**chat, "model": "file:/models/none.gguf"})
    assert unknown.status == 404 and unknown.json()["error"]["code"] == "model_not_found"
    tuned = await api.post("/v1/completions", json={**prompt, "temperature": 0.2, "top_k": 40, "stop": ["\n"]})
    assert tuned.status == 200
    out_of_range = await api.post("/v1/completions", json={**prompt, "top_p": 5}, valid_request=False)
    assert out_of_range.status == 400 and out_of_range.json()["error"]["param"] == "top_p"
    late = await api.post("/v1/completions", json=prompt, headers={"X-Deadline-Ms": "0"})
    assert late.status == 400 and late.json()["error"]["code"] == "DEADLINE_UNMET"


# -- (3) real exchanges, pool-managerd --------------------------------------------------------


async def test_pool_managerd_answers_match_the_document(aiohttp_server, aiohttp_client, tmp_path):
    eng = await pmd_tests.engine(aiohttp_server, slots=2)
    api = Checked(await aiohttp_client(pmd_app(tmp_path)), PMD)
    (tmp_path / "engines" / "broken-r0.json").write_text("{")
    write_handoff(tmp_path / "engines", pmd_tests.handoff_for(eng, pid=4242))
    write_handoff(tmp_path / "engines", Handoff(pool_id="pool-f", replica_id="r0", url="",
                                                error="model file /m/x.gguf does not exist"))

    async def both_known():
        pools = (await api.get("/v2/pools")).json()["pools"]
        states = {p["pool_id"]: p["state"] for p in pools}
        return states.get("pool-0") == "ready" and states.get("pool-f") == "failed" and pools
    pools = {p["pool_id"]: p for p in await eventually(both_known, what="a ready and a failed pool")}
    assert pools["pool-0"]["engine_pid"] == 4242 and pools["pool-f"]["last_error"].startswith("model file")
    health = await api.get("/health")
    assert health.json()["malformed_handoffs"] == ["broken-r0.json"]
    assert (await api.get("/v2/pools/pool-0/status")).json()["slots_total"] == 2
    missing = await api.get("/v2/pools/nope/status")
    assert missing.status == 404 and missing.json() == {"code": "POOL_NOT_FOUND", "message": "pool nope not found"}
    metrics = await api.get("/metrics")
    assert metrics.headers["Content-Type"].startswith("text/plain") and b"pool_ready" in metrics.body
    assert (await api.post("/v2/pools/pool-0/reload", json={"new_model_ref": ""}, valid_request=False)).status == 400
    assert (await api.post("/v2/pools/pool-0/reload", json={"new_model_ref": "file:/m/y.gguf"})).status == 503
    assert (await api.post("/v2/pools/nope/reload", json={"new_model_ref": "file:/m/y.gguf"})).status == 404
    assert (await api.post("/v2/pools/pool-0/drain", json={"deadline_ms": -1}, valid_request=False)).status == 400
    assert (await api.post("/v2/pools/nope/drain")).status == 404
    not_drained = await api.post("/v2/pools/pool-0/undrain")
    assert not_drained.status == 409 and not_drained.json()["code"] == "POOL_NOT_DRAINED"
    assert (await api.post("/v2/pools/nope/undrain")).status == 404
    drain = await api.post("/v2/pools/pool-0/drain")  # no body: the default deadline
    assert drain.status == 202 and drain.json()["deadline_ms"] == 30_000
    assert (await api.get("/openapi.json")).json()["info"]["title"] == "llama-orch pool-managerd"


# -- (4) GET /openapi.json --------------------------------------------------------------------


async def test_openapi_json_serves_each_document(aiohttp_client, tmp_path):
    for name, app in (("orchestratord", orchd_app()), ("pool_managerd", pmd_app(tmp_path))):
        client = await aiohttp_client(app)
        got = await client.get("/openapi.json")
        assert got.status == 200 and got.content_type == "application/json"
        served = await got.json()
        assert served == document(name) and served["info"]["version"] == __version__


def test_an_unknown_document_is_refused_by_name():
    with pytest.raises(ValueError, match="no OpenAPI document named 'nope'"):
        add_openapi_route(web.Application(), "nope")
