"""Tracing with OpenTelemetry: off unless the standard OTEL_* variables turn it on.

Three spans follow an operation (docs/design.md, "Tracing"):
- ``intake``: one per request (HTTP, RPC) or inbox entry, a child of the caller's W3C
  ``traceparent`` when it sent a valid one. Its context is stored with each of the
  request's operations (``Operation.traceparent``), so it travels wherever the operation
  goes: the work streams, a key's queue, a runAt's wait, the sweeper's re-enqueueing.
- ``batch``: one per batch transaction, a root, linked to the stored context of each of
  its operations.
- ``publish``: one per outcome message, a child of its operations' context when they share
  one (else linked to each); its own context goes in the message's AMQP ``traceparent``
  header, so the caller following its request sees the outcome in the same trace.

While no exporter is configured nothing is installed: ``tracer`` stays None, the doors read
no header, and each hook returns at its first test.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib.metadata import entry_points
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from streamsvc.errors import ConfigError
from streamsvc.model import Outcome, Receipt, Rejection, WorkOp

NAME = "streamsvc"
MAX_HEADER_CHARS = 512  # a traceparent is 55, a tracestate at most 32 short members
MAX_IDS = 100  # operation ids named on one span
TRACEPARENT_CHARS = 55  # "00-<32 hex trace id>-<16 hex span id>-<2 hex flags>"

tracer: trace.Tracer | None = None  # None: tracing is off
_max_links = 128
_provider: Any = None  # the SDK's TracerProvider this module installed, to flush at exit
_propagator = TraceContextTextMapPropagator()


# -- configuration ---------------------------------------------------------------------
def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """Pure: the span exporters the standard variables ask for, as entry point names of
    ``opentelemetry_traces_exporter`` (empty: tracing stays off). OTEL_TRACES_EXPORTER
    names them (``none``: none); an OTEL_EXPORTER_OTLP(_TRACES)_ENDPOINT alone means
    ``otlp``, whose protocol OTEL_EXPORTER_OTLP(_TRACES)_PROTOCOL picks, as the SDK does."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not names:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        names = "otlp" if endpoint else "none"
    if names == "none":
        return []
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    otlp = "otlp_proto_http" if protocol.startswith("http") else "otlp_proto_grpc"
    return [otlp if n.strip() == "otlp" else n.strip() for n in names.split(",") if n.strip()]


def configure(*, max_links: int, environ: Mapping[str, str] | None = None) -> bool:
    """Install a TracerProvider exporting through a BatchSpanProcessor to the exporters the
    OTEL_* variables name; whether tracing is on. Sampler, resource, limits, the
    exporters' endpoints and the processor's queue are the SDK's own reading of the same
    variables. A batch span may link every operation of a batch: ``max_links`` (the batch
    limit) unless OTEL_SPAN_LINK_COUNT_LIMIT says otherwise."""
    env = os.environ if environ is None else environ
    names = exporter_names(env)
    if not names:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: NAME}))
    limits = None if "OTEL_SPAN_LINK_COUNT_LIMIT" in env else SpanLimits(max_links=max_links)
    provider = TracerProvider(resource=resource, span_limits=limits)
    for name in names:
        found = next(iter(entry_points(group="opentelemetry_traces_exporter", name=name)), None)
        if found is None:
            raise ConfigError(f"OTEL_TRACES_EXPORTER: no span exporter named {name!r} installed")
        provider.add_span_processor(BatchSpanProcessor(found.load()()))
    trace.set_tracer_provider(provider)
    install(provider, max_links=max_links)
    return True


def install(provider: trace.TracerProvider, *, max_links: int = 1000) -> None:
    """Trace with ``provider`` from now on (``configure``, and tests with their own)."""
    global tracer, _provider, _max_links
    tracer = provider.get_tracer(NAME)
    _provider = provider
    _max_links = max_links


def shutdown() -> None:
    """Export what is buffered and stop tracing (at the end of ``streamsvc run``)."""
    global tracer, _provider
    if _provider is not None and hasattr(_provider, "shutdown"):
        _provider.shutdown()
    tracer = _provider = None


# -- the caller's context ----------------------------------------------------------------
def caller_context(headers: Mapping[Any, Any], *, keys: tuple[Any, Any] | None = None) -> Context:
    """The context a caller's ``traceparent`` (and ``tracestate``) headers carry; an empty
    one (a new trace) when absent or not valid W3C. Values may be str or bytes; longer
    than MAX_HEADER_CHARS, they are ignored unread. ``keys``: the two names as ``headers``
    spells them (bytes for a Redis entry's fields)."""
    carrier: dict[str, str] = {}
    names = ("traceparent", "tracestate")
    for name, key in zip(names, keys or names, strict=True):
        value = headers.get(key)
        if isinstance(value, bytes | bytearray):
            value = value.decode("latin-1") if len(value) <= MAX_HEADER_CHARS else None
        if isinstance(value, str) and len(value) <= MAX_HEADER_CHARS:
            carrier[name] = value
    if "traceparent" not in carrier:
        return Context()
    try:
        return _propagator.extract(carrier)  # ignores what is not valid W3C
    except Exception:  # a hostile value must never fail the request
        return Context()


def traceparent(context: SpanContext) -> str | None:
    """The W3C ``traceparent`` of ``context`` (version 00), or None when it is not valid."""
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def span_context(value: str | None) -> SpanContext | None:
    """The remote span context a stored ``traceparent`` names; None when there is none or
    it is not of the form ``traceparent`` writes."""
    if value is None or len(value) != TRACEPARENT_CHARS or value[:3] != "00-":
        return None
    try:
        trace_id, span_id, flags = int(value[3:35], 16), int(value[36:52], 16), int(value[53:], 16)
    except ValueError:
        return None
    if value[35] != "-" or value[52] != "-" or not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))


def links(traceparents: Iterable[str | None]) -> list[Link]:
    """One link to each distinct valid context among ``traceparents``, at most the limit."""
    out: list[Link] = []
    seen: set[str] = set()
    for value in traceparents:
        if value is None or value in seen:
            continue
        seen.add(value)
        context = span_context(value)
        if context is not None:
            out.append(Link(context))
            if len(out) >= _max_links:
                break
    return out


# -- intake --------------------------------------------------------------------------------
class Intake:
    """One request's (or inbox entry's) intake span, and the context its operations store."""

    __slots__ = ("span", "traceparent")

    def __init__(self, span: Span | None) -> None:
        self.span = span
        self.traceparent = traceparent(span.get_span_context()) if span is not None else None

    def traces(self, count: int) -> list[str | None] | None:
        """What each of ``count`` operations stores (None: nothing, tracing is off)."""
        return None if self.traceparent is None else [self.traceparent] * count

    def finish(
        self, results: Sequence[Receipt | Rejection] = (), error: BaseException | None = None
    ) -> None:
        span = self.span
        if span is None:
            return
        if span.is_recording():
            ids = [r.id for r in results if isinstance(r, Receipt)]
            span.set_attribute("streamsvc.operations", len(results))
            if ids:
                span.set_attribute("streamsvc.operation.ids", ids[:MAX_IDS])
            refused = [r for r in results if isinstance(r, Rejection)]
            if error is not None:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            elif refused:
                span.set_attribute("streamsvc.refused", len(refused))
                if not ids:
                    span.set_status(Status(StatusCode.ERROR, refused[0].message[:200]))
        span.end()
        self.span = None


OFF = Intake(None)


def start_intake(
    source: str, headers: Mapping[Any, Any] | None = None, *, bytes_keys: bool = False
) -> Intake:
    """An intake span for a request from ``source``, a child of the context its
    ``headers`` carry (None: of the current one, see ``caller``). OFF while tracing is
    off: nothing is read."""
    if tracer is None:
        return OFF
    keys = (b"traceparent", b"tracestate") if bytes_keys else None
    kind = SpanKind.SERVER if source in ("http", "rpc") else SpanKind.CONSUMER
    span = tracer.start_span(
        "intake",
        context=None if headers is None else caller_context(headers, keys=keys),
        kind=kind,
        attributes={"streamsvc.source": source},
    )
    return Intake(span)


@contextmanager
def intake(source: str, headers: Mapping[Any, Any] | None = None) -> Iterator[Intake]:
    """``start_intake`` as a block: ended at its end, unless ``finish`` was called in it."""
    span = start_intake(source, headers)
    try:
        yield span
    except BaseException as exc:
        span.finish(error=exc)
        raise
    span.finish()


@contextmanager
def caller(headers: Mapping[Any, Any] | None) -> Iterator[None]:
    """Within the block, the caller's context (from ``headers``) is the current one: the
    parent of the spans a request handler starts deep down (``start_intake(source)``)."""
    if tracer is None:
        yield
        return
    token = otel_context.attach(caller_context(headers or {}))
    try:
        yield
    finally:
        otel_context.detach(token)


# -- the batch transaction -----------------------------------------------------------------
@contextmanager
def batch(items: Sequence[WorkOp], batch_id: str) -> Iterator[Span | None]:
    """The span of one batch transaction (None while tracing is off): a root linked to
    each operation's stored context. An exception leaving the block is recorded on it."""
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(
        "batch",
        context=Context(),
        kind=SpanKind.INTERNAL,
        links=links(item.op.traceparent for item in items),
        attributes={"streamsvc.batch.id": batch_id, "streamsvc.operations": len(items)},
    ) as span:
        yield span


def batch_done(span: Span | None, outcomes: Sequence[Outcome]) -> None:
    if span is not None and span.is_recording():
        failed = sum(o.status.value == "FAIL" for o in outcomes)
        span.set_attribute("streamsvc.succeeded", len(outcomes) - failed)
        span.set_attribute("streamsvc.failed", failed)


# -- publishing an outcome -------------------------------------------------------------------
@contextmanager
def publish(
    outcomes: Sequence[Outcome], *, exchange: str | None, routing_key: str
) -> Iterator[dict[str, Any] | None]:
    """The span of publishing one message reporting ``outcomes``; yields the AMQP headers
    that carry its context (None while tracing is off). Its parent is the operations'
    stored context when they share one; otherwise it links to each."""
    if tracer is None:
        yield None
        return
    stored = {o.traceparent for o in outcomes}
    parent = span_context(stored.pop()) if len(stored) == 1 else None
    context = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent else Context()
    ids = [o.id for o in outcomes]
    with tracer.start_as_current_span(
        "publish",
        context=context,
        kind=SpanKind.PRODUCER,
        links=[] if parent else links(o.traceparent for o in outcomes),
        attributes={
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "send",
            "messaging.destination.name": exchange or routing_key,
            "messaging.rabbitmq.destination.routing_key": routing_key,
            "streamsvc.operations": len(ids),
            "streamsvc.operation.ids": ids[:MAX_IDS],
            "streamsvc.batch.ids": sorted({o.batch_id for o in outcomes if o.batch_id})[:MAX_IDS],
        },
    ) as span:
        headers: dict[str, Any] = {}
        _propagator.inject(headers, context=trace.set_span_in_context(span))
        yield headers
