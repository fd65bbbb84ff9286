"""Tracing's cost (`just bench --only tracing`): the inbox's throughput with tracing on,
beside the same with it off, alternated in one run (docs/benchmarks.md).

On, each `streamsvc run` process exports every span (always_on sampling: an intake span per
operation, a batch span per transaction, a publish span per outcome message) with the OTLP
gRPC exporter and the SDK's BatchSpanProcessor to ``Sink``, an OTLP trace receiver in this
process that counts what it receives and answers success: what a collector on the same
host costs the service, nothing of a backend's."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that only counts spans."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        with self._lock:
            self.spans += count
        return trace_service_pb2.ExportTraceServiceResponse()


@contextmanager
def sink() -> Iterator[tuple[Sink, dict[str, str]]]:
    """A running Sink, and the settings that make a service export to it."""
    receiver = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_TRACES_SAMPLER": "always_on",
    }
    try:
        yield receiver, env
    finally:
        server.stop(grace=None)
