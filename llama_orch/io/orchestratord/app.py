"""orchestratord's HTTP app: the routes, ``create_app`` and ``main``.

This module serves the v2 API (tasks, events, cancel, sessions, pools, drain and reload
forwarded to the owning pool-managerd, capabilities, version, metrics, the pool-ready callback,
probes) and mounts the rest: ``/v2/nodes/*`` (``nodes``), ``/v1/*`` (``openai_api``) and
``/openapi.json`` (``openapi_doc``). Handlers stay thin: parse, hand an event to the
``CoreDriver`` (``driver``), stream what comes back. Pools come from ``PoolDiscovery``; every
non-204 response carries ``X-Correlation-Id`` (``http.correlation``). Every request runs as a
principal (``auth``); another principal's task or session is answered 404, as if there were none
(``tenancy``). SIGTERM stops admission, lets admitted tasks finish within the grace, then cancels
the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
import sys
from typing import Awaitable, Callable

import aiohttp
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ... import __version__
from ...core.admission import QueuePolicy
from ...core.commands import Rejected
from ...core.events import TaskCanceled
from ...core.orchestrator import Orchestrator, OrchestratorConfig
from ...core.quotas import QuotaPolicy
from ...core.placement import Strategy
from ...core.sessions import BudgetPolicy
from ..client_auth import ApiKey, OidcSettings
from ..config import ConfigError, OrchdSettings
from ..daemon import prepare, settle_gc, spawn
from ..http import (
    AccessLogger,
    CORRELATION_ID,
    correlation,
    fail,
    json_body,
    json_response,
    retry_headers,
    serve_metrics_on,
)
from ..openapi_doc import add_openapi_route
from ..tls import TlsContexts, describe_failure, require_peer_certificate
from ..tracing import Tracing, end, incoming_context
from ..tracing import setup as setup_tracing
from ..waits import within
from .adapters import Timeouts
from .auth import auth_middleware, principal_of
from .discovery import PoolDiscovery, pool_stale_ms
from .driver import DRIVER, SERVED_WORKLOADS, CoreDriver, Cursor, StreamLimits
from .metrics import count_wire_rejections
from .nodes import NODE_PATHS, add_node_routes
from .oidc import OidcVerifier
from .openai_api import add_openai_routes
from .wire import WireError

log = logging.getLogger("llama_orch.orchestratord")


DISCOVERY = web.AppKey("discovery", PoolDiscovery)
PROFILE = web.AppKey("profile", str)
#: Stop admitting, let admitted tasks finish within the grace, cancel the rest (SIGTERM's work).
DRAIN = web.AppKey("drain", Callable[[web.Application], Awaitable[None]])


def _rejection(decision: Rejected) -> web.Response:
    body = {"code": decision.code, "message": decision.message, "retriable": decision.retriable}
    for name in ("retry_after_ms", "policy_label", "pool_id"):
        if getattr(decision, name) is not None:
            body[name] = getattr(decision, name)
    resp = json_response(body, decision.http_status)
    if decision.http_status in (429, 503):
        resp.headers.update(retry_headers(decision.retry_after_ms or 1000))
    return resp


async def create_task(request: web.Request) -> web.Response:
    driver = request.app[DRIVER]
    try:
        decision = driver.submit(await json_body(request), request[CORRELATION_ID], principal=principal_of(request))
    except WireError as exc:
        return json_response({"code": "INVALID_PARAMS", "message": str(exc), "field": exc.field}, 400)
    if isinstance(decision, Rejected):
        return _rejection(decision)
    tid = decision.task_id
    task = driver.core.task(tid)
    budget = _budget_headers(driver.core.sessions.view(task.spec.session_id)) if task else {}
    resp = json_response({
        "task_id": tid, "queue_position": decision.queue_position, "predicted_start_ms": decision.predicted_start_ms,
        "backoff_ms": decision.backoff_ms,
        "streams": {"sse": f"/v2/tasks/{tid}/events", "sse_verbose": f"/v2/tasks/{tid}/events?verbose=true"}}, 202)
    resp.headers.update(budget)
    return resp


async def task_events(request: web.Request) -> web.StreamResponse:
    driver = request.app[DRIVER]
    tid = request.match_info["task_id"]
    stream = driver.streams.get(tid)
    if stream is None or stream.owner != principal_of(request):  # another principal's: as if there were none
        return json_response({"code": "TASK_NOT_FOUND", "message": f"task {tid} not found"}, 404)
    verbose = request.query.get("verbose", "false").lower() in ("true", "1", "yes")
    last_id = request.headers.get("Last-Event-ID", "").strip()
    if not last_id:  # none, or empty as the SSE spec's "no id yet"
        cursor = Cursor()
    else:  # a reconnecting reader goes on after the last event it got
        try:
            cursor = stream.cursor_after(int(last_id))
        except ValueError:
            fail(400, "INVALID_PARAMS", f"Last-Event-ID: expected the id of an event of this stream, got {last_id!r}")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Correlation-Id": request[CORRELATION_ID]})
    transport = request.transport
    driver.reader_joined(tid, stream, transport)  # before the first await: a reader leaving meanwhile must count this one
    finished = False
    span = driver.tracing.start("sse_stream", parent=stream.span, attributes={"task_id": tid, "verbose": verbose}) \
        if driver.tracing is not None and stream.span is not None else None
    try:
        await resp.prepare(request)
        while True:
            out = stream.read(cursor, verbose)
            if out:
                await resp.write(b"".join(out))
                continue
            if stream.done:
                break
            await stream.wait_for_change(request)
        finished = True
        await resp.write_eof()
    except ConnectionError as exc:
        # A client going away is normal: one line, no traceback (aiohttp logs an escaped
        # exception at ERROR with its stack, thousands of lines for a burst of resets).
        log.info("task %s: SSE reader went away (%s)", tid, type(exc).__name__)
    finally:
        driver.reader_left(tid, stream, transport, early=not finished)
        end(span, outcome="complete" if finished else "reader_left")
    return resp


async def cancel_task(request: web.Request) -> web.Response:
    driver = request.app[DRIVER]
    tid = request.match_info["task_id"]
    stream = driver.streams.get(tid)
    if stream is None or stream.owner != principal_of(request):
        return json_response({"code": "TASK_NOT_FOUND", "message": f"task {tid} not found"}, 404)
    driver.handle(TaskCanceled(task_id=tid, reason="client"))
    return web.Response(status=204)


async def list_pools(request: web.Request) -> web.Response:
    placer = request.app[DRIVER].core.placer
    pools = []
    for pool_id in placer.pool_ids():
        snap = placer.snapshot(pool_id)
        leases = placer.leases(pool_id)
        pools.append({"pool_id": pool_id, "ready": placer.is_usable(pool_id), "live": snap.live,
                      "draining": snap.draining, "slots_total": snap.slots_total,
                      "slots_free": max(0, snap.slots_total - leases), "leases": leases, "model_ref": snap.model_ref,
                      "engine": snap.engine, "engine_version": snap.engine_version, "engine_url": snap.engine_url,
                      "ctx_max": snap.ctx_max, "device_mask": snap.device_mask, "replica_id": snap.replica_id,
                      "vram_total_bytes": snap.vram_total_bytes, "vram_free_bytes": snap.vram_free_bytes,
                      "manager_url": snap.manager_url, "last_error": _last_error(request, snap)})
    return json_response({"pools": pools})


def _last_error(request: web.Request, snap) -> str | None:
    """The pool's own error, or its manager's while orchestratord cannot reach it (a TLS failure
    says so there, rather than the pool looking merely silent)."""
    manager = request.app[DISCOVERY].owner_of(snap.pool_id)
    if manager is not None and not manager.reachable and manager.last_error:
        return manager.last_error
    return snap.last_error


def _snapshot(request: web.Request):
    placer = request.app[DRIVER].core.placer
    pool_id = request.match_info["pool_id"]
    snap = placer.snapshot(pool_id)
    if snap is None:
        fail(404, "POOL_NOT_FOUND", f"pool {pool_id} not found")
    return placer, snap


async def pool_health(request: web.Request) -> web.Response:
    placer, snap = _snapshot(request)
    leases = placer.leases(snap.pool_id)
    return json_response({"pool_id": snap.pool_id, "live": snap.live, "ready": placer.is_usable(snap.pool_id),
                          "draining": snap.draining, "last_error": _last_error(request, snap),
                          "metrics": {"slots_total": snap.slots_total, "leases": leases,
                                      "slots_free": max(0, snap.slots_total - leases),
                                      "vram_free_bytes": snap.vram_free_bytes}})


async def _forward(request: web.Request, action: str) -> web.Response:
    """Drain and reload belong to the pool's own pool-managerd: pass them on, answer with its reply."""
    _, snap = _snapshot(request)
    body = await json_body(request)
    if not snap.manager_url:
        fail(503, "POOL_UNAVAILABLE", f"pool {snap.pool_id} has no known pool-managerd")
    driver = request.app[DRIVER]
    url = f"{snap.manager_url}/v2/pools/{snap.pool_id}/{action}"
    try:
        async with request.app[DISCOVERY].session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            return web.Response(body=await resp.read(), status=resp.status, content_type="application/json")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        fail(503, "POOL_UNAVAILABLE", f"pool-managerd {snap.manager_url}: "
                                      f"{describe_failure(driver.tls, 'pool-managerd', exc)}")


async def pool_drain(request: web.Request) -> web.Response:
    return await _forward(request, "drain")


async def pool_reload(request: web.Request) -> web.Response:
    return await _forward(request, "reload")


async def pool_undrain(request: web.Request) -> web.Response:
    return await _forward(request, "undrain")


async def capabilities(request: web.Request) -> web.Response:
    placer = request.app[DRIVER].core.placer
    engines: dict[str, dict] = {}
    for pool_id in placer.pool_ids():
        if not placer.is_usable(pool_id):
            continue
        snap = placer.snapshot(pool_id)
        e = engines.setdefault(snap.engine, {"engine": snap.engine, "ctx_max": 0, "slots": 0, "models": set(),
                                             "versions": set()})
        e["ctx_max"] = max(e["ctx_max"], snap.ctx_max)
        e["slots"] += snap.slots_total
        e["models"].add(snap.model_ref)
        e["versions"].add(snap.engine_version or "unknown")
    listed = [{**e, "models": sorted(e["models"]), "versions": sorted(e["versions"])} for _, e in sorted(engines.items())]
    return json_response({"api_version": "v2", "profile": request.app[PROFILE], "engines": listed,
                          "workloads": list(SERVED_WORKLOADS)})


async def version(request: web.Request) -> web.Response:
    return json_response({"version": __version__, "api_version": "v2"})


async def metrics(request: web.Request) -> web.Response:
    driver = request.app[DRIVER]
    return web.Response(body=driver.metrics.render(driver.core), headers={"Content-Type": CONTENT_TYPE_LATEST})


_BUDGET_HEADERS = (("tokens_used", "X-Budget-Tokens-Used"), ("tokens_remaining", "X-Budget-Tokens-Remaining"),
                   ("time_used_ms", "X-Budget-Time-Used-Ms"), ("time_remaining_ms", "X-Budget-Time-Remaining-Ms"),
                   ("cost_used", "X-Budget-Cost-Used"), ("cost_remaining", "X-Budget-Cost-Remaining"))


def _budget_headers(view: dict) -> dict[str, str]:
    """Used amounts always; remaining ones for the budgets that are configured."""
    return {header: str(view[key]) for key, header in _BUDGET_HEADERS if view[key] is not None}


async def get_session(request: web.Request) -> web.Response:
    driver = request.app[DRIVER]
    core = driver.core
    sid = request.match_info["session_id"]
    if sid not in core.sessions or not driver.tenancy.owns_session(principal_of(request), sid):
        fail(404, "SESSION_NOT_FOUND", f"session {sid} not found")
    view = core.sessions.view(sid)
    resp = json_response(view)
    resp.headers.update(_budget_headers(view))
    return resp


async def delete_session(request: web.Request) -> web.Response:
    sid = request.match_info["session_id"]
    driver = request.app[DRIVER]
    if not driver.tenancy.owns_session(principal_of(request), sid) or not driver.core.forget_session(sid):
        fail(404, "SESSION_NOT_FOUND", f"session {sid} not found")
    driver.tenancy.session_deleted(sid)
    return web.Response(status=204)


async def pool_ready_callback(request: web.Request) -> web.Response:
    body = await json_body(request)
    pool_id = body.get("pool_id")
    if not isinstance(pool_id, str) or not pool_id:
        fail(400, "INVALID_PARAMS", "pool_id: expected the id of the pool that became ready")
    discovery = request.app[DISCOVERY]
    await discovery.poll_all()  # bind at once instead of waiting for the next poll
    return json_response({"pool_id": pool_id, "known": pool_id in request.app[DRIVER].core.placer}, 202)


async def livez(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    driver = request.app[DRIVER]
    placer = driver.core.placer
    ready = [p for p in placer.pool_ids() if placer.is_usable(p)]
    ok = bool(ready) and driver.accepting
    resp = json_response({"ready": ok, "ready_pools": len(ready), "accepting": driver.accepting}, 200 if ok else 503)
    if not ok:
        resp.headers.update(retry_headers(1000))
    return resp


def create_app(config: OrchestratorConfig, manager_urls: list[str], *, poll_interval_ms: int = 5000,
               seed: int = 0, shutdown_grace_s: float = 30.0, timeouts: Timeouts = Timeouts(),
               node_stale_after_ms: float = 30_000.0, profile: str = "cloud",
               api_keys: tuple[str | ApiKey, ...] = (), oidc: OidcSettings | None = None,
               quotas: QuotaPolicy | None = None, metrics_host: str = "127.0.0.1",
               metrics_port: int | None = None, stream_limits: StreamLimits = StreamLimits(),
               tune_gc: bool = False, tls: TlsContexts | None = None,
               tls_node_names: tuple[str, ...] = ("pool-managerd",),
               tracing: Tracing | None = None) -> web.Application:
    """orchestratord's app. ``tune_gc`` (the daemon's, not a test's: it freezes the whole process's
    heap) settles the garbage collector once the app is built (``daemon.settle_gc``). Client auth:
    ``api_keys`` (``KEY`` or ``NAME=KEY``) and ``oidc``; neither: every request is ``anonymous``."""
    verifier = OidcVerifier(oidc) if oidc is not None else None
    authenticate = auth_middleware(api_keys, verifier)
    middlewares = [count_wire_rejections(DRIVER), correlation, *([incoming_context()] if tracing is not None else []),
                   *([require_peer_certificate(NODE_PATHS, tls_node_names)] if tls is not None else []),
                   *([authenticate] if authenticate is not None else [])]
    app = web.Application(middlewares=middlewares)
    app[PROFILE] = profile
    driver = app[DRIVER] = CoreDriver(Orchestrator(config, rng=random.Random(seed)), timeouts=timeouts,
                                      limits=stream_limits, tls=tls, tracing=tracing, quotas=quotas)
    app[DISCOVERY] = PoolDiscovery(manager_urls, driver.handle, interval_ms=poll_interval_ms,
                                   on_check=driver.metrics.health_check, tls=tls, tracing=tracing)
    driver.poll_span_of = app[DISCOVERY].poll_span
    if tls is not None:
        driver.metrics.registry.register(tls.collector("orchestratord"))

    async def resources(app: web.Application):
        if tune_gc:
            settle_gc()  # before the GC is watched: the start-up collection is no pause under load
            driver.collect_when_idle = True
        await driver.start()
        if verifier is not None:
            await verifier.start()  # loads the issuer's keys in the background: never waits for it
        await app[DISCOVERY].start()
        watchers: set[asyncio.Task] = set()
        if tls is not None:
            spawn(tls.watch(), watchers, log)  # a crash of the watcher is logged at once
        yield
        for watcher in watchers:
            watcher.cancel()
        await app[DISCOVERY].stop()
        await driver.stop()
        if verifier is not None:
            await verifier.stop()
        if tracing is not None:
            tracing.shutdown()  # what is still batched goes out

    async def drain_streams(app: web.Application) -> None:
        """SIGTERM: stop admitting, let admitted tasks finish within the grace, then cancel the rest.
        Run twice on a daemon's SIGTERM (``drain_before_closing``, then aiohttp's shutdown): the
        second finds the work done."""
        if not driver.accepting and driver.idle.is_set():
            return
        driver.accepting = False
        log.info("shutting down: %d tasks to finish (grace %.0f s)", len(driver.core.tasks), shutdown_grace_s)
        if not await within(driver.idle.wait(), shutdown_grace_s):
            # Every stream gets its terminal event now, so its reader's handler returns at once.
            log.warning("shutdown grace over: canceled %d tasks", driver.cancel_all("shutdown"))

    app.cleanup_ctx.append(resources)
    add_node_routes(app, app[DISCOVERY], stale_after_ms=node_stale_after_ms)
    add_openai_routes(app)
    add_openapi_route(app, "orchestratord")
    serve_metrics_on(app, metrics_host, metrics_port, metrics, DRIVER)
    app.on_shutdown.append(drain_streams)
    app[DRAIN] = drain_streams
    app.router.add_post("/v2/tasks", create_task)
    app.router.add_get("/v2/tasks/{task_id}/events", task_events)
    app.router.add_post("/v2/tasks/{task_id}/cancel", cancel_task)
    app.router.add_get("/v2/sessions/{session_id}", get_session)
    app.router.add_delete("/v2/sessions/{session_id}", delete_session)
    app.router.add_get("/v2/pools", list_pools)
    app.router.add_get("/v2/pools/{pool_id}/health", pool_health)
    app.router.add_post("/v2/pools/{pool_id}/drain", pool_drain)
    app.router.add_post("/v2/pools/{pool_id}/reload", pool_reload)
    app.router.add_post("/v2/pools/{pool_id}/undrain", pool_undrain)
    app.router.add_get("/v2/meta/capabilities", capabilities)
    app.router.add_get("/v2/meta/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/callbacks/pool-ready", pool_ready_callback)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    return app


def stream_limits(settings: OrchdSettings) -> StreamLimits:
    return StreamLimits(buffer_frames=settings.stream_buffer_frames, buffer_bytes=settings.stream_buffer_bytes,
                        retained_streams=settings.retained_streams,
                        retained_ttl_s=settings.retained_stream_ttl_ms / 1000,
                        retained_bytes=settings.retained_stream_bytes)


def core_config(settings: OrchdSettings) -> tuple[OrchestratorConfig, Timeouts]:
    """The core's configuration and the adapters' timeouts from the daemon's settings."""
    config = OrchestratorConfig(
        admission_capacity=settings.admission_capacity, admission_policy=QueuePolicy(settings.admission_policy),
        placement_strategy=Strategy(settings.placement_strategy), pool_stale_ms=pool_stale_ms(settings.poll_interval_ms),
        first_token_timeout_ms=settings.first_token_timeout_ms, token_timeout_ms=settings.token_timeout_ms,
        metrics_interval_ms=settings.metrics_interval_ms or None,
        prefix_block_tokens=settings.prefix_block_tokens, prefix_load_slack=settings.prefix_load_slack,
        prefix_blocks_per_pool=settings.prefix_blocks_per_pool,
        budgets=BudgetPolicy(tokens=settings.session_token_budget, time_ms=settings.session_time_budget_ms,
                             cost=settings.session_cost_budget,
                             cost_per_1k_prompt_tokens=settings.cost_per_1k_prompt_tokens,
                             cost_per_1k_output_tokens=settings.cost_per_1k_output_tokens))
    # The core's timers decide; the adapter's read timeouts are the backstop a little behind them.
    timeouts = Timeouts(connect_s=settings.connect_timeout_ms / 1000,
                        first_token_s=settings.first_token_timeout_ms / 1000 + 1,
                        between_tokens_s=settings.token_timeout_ms / 1000 + 1, total_s=settings.stream_timeout_ms / 1000)
    return config, timeouts


def describe_auth(settings: OrchdSettings) -> str:
    """Client auth in one line for the start-up log: principals and the issuer, never a key."""
    parts = []
    if settings.api_keys:
        parts.append("API keys of " + ", ".join(k.principal for k in settings.api_keys))
    if settings.oidc is not None:
        parts.append(f"OIDC tokens of {settings.oidc.issuer} for {', '.join(settings.oidc.audiences)}")
    return " and ".join(parts) or "none (loopback only; every client is the principal anonymous)"


async def drain_before_closing(app: web.Application) -> None:
    """SIGTERM drains while the listening socket stays open, then exits. aiohttp's own handler
    closes the socket first, so a client arriving during the drain would meet a refused
    connection instead of the 503 "shutting down" (retry on another replica) and a failing
    ``/readyz`` that tell it and its load balancer to go elsewhere. A second SIGTERM exits at once.
    Installed at start-up, after ``run_app``'s own signal handlers, which it replaces."""
    loop = asyncio.get_running_loop()
    draining: list[asyncio.Future] = []  # a reference, so the drain is not collected while it runs

    def exit_now() -> None:
        raise web.GracefulExit()  # out of the loop: run_app's shutdown (sites, then the app) follows

    def on_sigterm() -> None:
        loop.add_signal_handler(signal.SIGTERM, exit_now)

        async def drain_then_exit() -> None:
            try:
                await app[DRAIN](app)
            finally:
                loop.call_soon(exit_now)
        draining.append(asyncio.ensure_future(drain_then_exit()))

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="orchestratord", description="llama-orch control plane")
    parser.add_argument("--bind", help="HOST:PORT (env ORCHD_BIND_ADDR, default 127.0.0.1:8080)")
    parser.add_argument("--pool-managers", help="comma-separated pool-managerd URLs (env ORCHD_POOL_MANAGERS)")
    args = parser.parse_args(argv)
    prepare("orchestratord")
    try:
        settings = OrchdSettings.from_env(bind=args.bind, pool_managers=args.pool_managers)
    except ConfigError as exc:
        print(f"orchestratord: error: {exc}", file=sys.stderr)
        return 2
    if not settings.pool_managers:
        log.warning("no pool managers configured (ORCHD_POOL_MANAGERS): every task will get 503 until one is")
    config, timeouts = core_config(settings)
    tls = TlsContexts(settings.tls, client_cert=settings.tls_client_cert) if settings.tls is not None else None
    tracing = setup_tracing("orchestratord")
    log.info("listening on %s://%s:%s, pool managers %s", "https" if tls else "http", settings.host, settings.port,
             ", ".join(settings.pool_managers))
    log.info("client auth: %s; quotas per principal: %s concurrent tasks, %s tasks a minute", describe_auth(settings),
             settings.quotas.concurrent_tasks or "unlimited", settings.quotas.tasks_per_minute or "unlimited")
    app = create_app(config, list(settings.pool_managers), poll_interval_ms=settings.poll_interval_ms,
                     shutdown_grace_s=settings.shutdown_grace_ms / 1000, timeouts=timeouts,
                     profile=settings.profile, api_keys=settings.api_keys, oidc=settings.oidc,
                     quotas=settings.quotas, metrics_host=settings.host,
                     metrics_port=settings.metrics_port, stream_limits=stream_limits(settings), tune_gc=True,
                     tls=tls, tls_node_names=settings.tls_node_names, tracing=tracing)
    app[DRIVER].task_log = settings.access_log
    app.on_startup.append(drain_before_closing)
    web.run_app(app, host=settings.host, port=settings.port, print=None, ssl_context=tls.server if tls else None,
                shutdown_timeout=settings.shutdown_grace_ms / 1000 + 5, backlog=settings.listen_backlog,
                handler_cancellation=True,  # a client that leaves cancels its handler, hence its task
                access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
                access_log_class=AccessLogger)
    return 0
