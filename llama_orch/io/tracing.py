"""OpenTelemetry tracing of the daemons: on when the standard ``OTEL_*`` environment asks for it.

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is
set, or ``OTEL_TRACES_EXPORTER`` is ``otlp`` or ``console``; ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none`` keeps it off. Spans go out over OTLP/HTTP in batches; the exporter
reads the standard variables (endpoint, headers, timeout, certificate, compression), the
resource reads ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``, the sampler
``OTEL_TRACES_SAMPLER``. With tracing off no span is made and nothing is propagated: each
instrumented place checks one attribute for None.

Each daemon owns its provider (not the process-global one), so tests can run several daemons in
one process, each with its own exporter. W3C ``traceparent`` goes out on every hop (``inject``)
and is taken from every request (``extract``). Attributes carry ids, pools, engines and
outcomes; never prompts, generated tokens, API keys or bearer tokens (``test_secrets`` greps every
exported span for them).

The span tree of one task (orchestratord): ``task`` (from the client's ``traceparent``) with
``admission``, ``placement`` (linked to the last ``pool_health_check`` of the chosen pool, whose
child is pool-managerd's ``get_status``), ``adapter_bind``, ``dispatch`` -> ``forward_to_engine``
(``traceparent`` to the engine) and ``sse_stream`` for each reader.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import daemon

log = logging.getLogger("llama_orch.tracing")
_PROPAGATOR = TraceContextTextMapPropagator()
#: A span attribute value's length cap: values are ids and names, and a long one is a mistake.
MAX_ATTRIBUTE = 256


def enabled_by(environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(exporter in ("otlp", "console") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


@dataclass(slots=True)
class Tracing:
    """One daemon's tracer and provider, and the helpers its instrumented places call."""

    tracer: trace.Tracer
    provider: TracerProvider

    def start(self, name: str, *, parent: Context | Span | None = None, kind: SpanKind = SpanKind.INTERNAL,
              attributes: Mapping[str, Any] | None = None, links: list[Link] | None = None,
              start_time: int | None = None) -> Span:
        context = trace.set_span_in_context(parent) if isinstance(parent, Span) else parent
        return self.tracer.start_span(name, context=context, kind=kind, attributes=_clean(attributes),
                                      links=links, start_time=start_time)

    @staticmethod
    def extract(headers: Mapping[str, str]) -> Context:
        return _PROPAGATOR.extract(headers)

    @staticmethod
    def inject(headers: MutableMapping[str, str], span: Span) -> MutableMapping[str, str]:
        _PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))
        return headers

    @contextlib.contextmanager
    def client_span(self, name: str, headers: MutableMapping[str, str], *, parent: Span | None = None,
                    attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
        """A CLIENT span around one call to a peer, its ``traceparent`` put in ``headers``."""
        span = self.start(name, parent=parent, kind=SpanKind.CLIENT, attributes=attributes)
        self.inject(headers, span)
        try:
            yield span
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what the batch processor holds


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not attributes:
        return None
    out = {}
    for key, value in attributes.items():
        if value is None:
            continue
        if isinstance(value, str) and len(value) > MAX_ATTRIBUTE:
            value = value[:MAX_ATTRIBUTE]
        out[key] = value
    return out


def end(span: Span | None, *, outcome: str | None = None, error: str | None = None,
        attributes: Mapping[str, Any] | None = None) -> None:
    """End ``span`` (None: tracing is off) with its outcome; an error code marks it failed."""
    if span is None:
        return
    if outcome is not None:
        span.set_attribute("outcome", outcome)
    if attributes:
        span.set_attributes(_clean(attributes) or {})
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def wall_ns_ago(ms: float) -> int:
    """The wall-clock time ``ms`` milliseconds ago, for a span that began before it was made."""
    return time.time_ns() - int(ms * 1_000_000)


def setup(service: str, environ: Mapping[str, str] | None = None, *,
          exporter: SpanExporter | None = None) -> Tracing | None:
    """The daemon's tracing, or None when the environment leaves it off. ``exporter`` (tests):
    spans go to it one by one, whatever the environment says."""
    env = os.environ if environ is None else environ
    if exporter is None and not enabled_by(env):
        return None
    attributes = {"service.name": env.get("OTEL_SERVICE_NAME") or service}
    provider = TracerProvider(resource=Resource.create(attributes))
    processor: SpanProcessor
    if exporter is not None:
        processor = SimpleSpanProcessor(exporter)
    elif env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        processor = BatchSpanProcessor(ConsoleSpanExporter())
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processor = BatchSpanProcessor(OTLPSpanExporter())
    provider.add_span_processor(processor)
    tracing = Tracing(tracer=provider.get_tracer("llama_orch", _version()), provider=provider)
    daemon.trace_ids = _current_ids
    log.info("tracing on: spans of %s to %s", attributes["service.name"],
             "a test exporter" if exporter is not None else
             env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or
             env.get("OTEL_TRACES_EXPORTER"))
    return tracing


def _version() -> str:
    from .. import __version__

    return __version__


def _current_ids() -> tuple[str, str] | None:
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def server_spans(tracing: Tracing, names: Mapping[str, str]):
    """Middleware: a SERVER span for each request, a child of the caller's ``traceparent``, named
    by its route (``names``: route pattern -> span name; others ``METHOD pattern``), current while
    the handler runs (so its log lines carry the trace id)."""

    @web.middleware
    async def traced(request: web.Request, handler):
        resource = request.match_info.route.resource
        pattern = resource.canonical if resource is not None else "unmatched"
        name = names.get(pattern) or f"{request.method} {pattern}"
        span = tracing.start(name, parent=tracing.extract(request.headers), kind=SpanKind.SERVER,
                             attributes={"http.request.method": request.method, "http.route": pattern,
                                         "pool_id": request.match_info.get("pool_id")})
        try:
            with trace.use_span(span, end_on_exit=False):
                resp = await handler(request)
        except web.HTTPException as exc:
            span.set_attribute("http.response.status_code", exc.status)
            if exc.status >= 500:
                span.set_status(Status(StatusCode.ERROR, str(exc.status)))
            raise
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        else:
            span.set_attribute("http.response.status_code", resp.status)
            return resp
        finally:
            span.end()

    return traced


def incoming_context():
    """Middleware (orchestratord): the caller's ``traceparent`` as the current context while the
    handler runs, so spans begun there (a task's) are its children."""
    from opentelemetry import context as otel_context

    @web.middleware
    async def continue_trace(request: web.Request, handler):
        if "traceparent" not in request.headers:
            return await handler(request)
        token = otel_context.attach(_PROPAGATOR.extract(request.headers))
        try:
            return await handler(request)
        finally:
            otel_context.detach(token)

    return continue_trace
