"""streamsvc.tracing's pure parts: which exporters the OTEL_* variables ask for, and what
counts as a caller's or a stored trace context."""

from __future__ import annotations

import pytest
from opentelemetry import trace

from streamsvc import tracing
from streamsvc.errors import ConfigError

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp_proto_grpc"]),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            ["otlp_proto_http"],
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, ["otlp_proto_grpc"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp_proto_grpc"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp_proto_grpc", "console"]),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, []),
    ],
)
def test_exporters_are_what_the_standard_variables_name(
    environ: dict[str, str], names: list[str]
) -> None:
    assert tracing.exporter_names(environ) == names


def test_off_without_an_exporter_nothing_is_installed() -> None:
    assert not tracing.configure(max_links=10, environ={"OTEL_SERVICE_NAME": "x"})
    assert tracing.tracer is None
    assert tracing.start_intake("http", {"traceparent": VALID}) is tracing.OFF


@pytest.mark.parametrize(
    ("headers", "valid"),
    [
        ({"traceparent": VALID}, True),
        ({"traceparent": VALID.encode()}, True),
        ({"traceparent": VALID, "tracestate": "a=1"}, True),
        ({"traceparent": VALID, "tracestate": "\x00" * 5000}, True),  # the state is dropped
        ({}, False),
        ({"traceparent": 42}, False),
        ({"traceparent": VALID.upper()}, False),
        ({"traceparent": "ff" + VALID[2:]}, False),
        ({"traceparent": VALID + "-" + "x" * 10_000}, False),
        ({"traceparent": b"\xff" * 55}, False),
    ],
)
def test_a_callers_context_is_taken_only_from_a_valid_traceparent(
    headers: dict[str, object], valid: bool
) -> None:
    context = trace.get_current_span(tracing.caller_context(headers)).get_span_context()
    assert context.is_valid is valid


@pytest.mark.parametrize(
    ("stored", "valid"),
    [
        (VALID, True),
        (None, False),
        (VALID[:-1], False),
        ("00-" + "0" * 32 + VALID[35:], False),
        (VALID[:35] + "x" + VALID[36:], False),
        (VALID.replace("b7ad", "zzzz"), False),
    ],
)
def test_a_stored_traceparent_names_a_remote_context(stored: str | None, valid: bool) -> None:
    context = tracing.span_context(stored)
    assert (context is not None) is valid
    if context is not None:
        assert context.is_remote and tracing.traceparent(context) == stored


def test_links_go_to_each_distinct_context_once() -> None:
    other = VALID[:-2] + "00"
    assert len(tracing.links([VALID, None, VALID, other, "junk"])) == 2


def test_an_exporter_not_installed_stops_start_up_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER: no span exporter named 'nope'"):
        tracing.configure(max_links=10, environ={"OTEL_TRACES_EXPORTER": "nope"})
    assert tracing.tracer is None
