"""The RPC server's reply path, against fakes: what the broker refuses never requeues."""

from __future__ import annotations

from typing import Any

import aiormq
import pytest
from structlog.testing import capture_logs

from streamsvc.api.rpc import ReplyChannel, RpcServer
from streamsvc.policy import RetryPolicy


class FakeRequest:
    """A request with a replyTo whose body is not JSON: answered with an error reply."""

    body = b"not json"
    reply_to = "amq.rabbitmq.reply-to.caller"
    correlation_id = "c-1"
    headers: dict[str, Any] = {}
    redelivered = False

    def __init__(self) -> None:
        self.settled: list[str] = []

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append(f"nack requeue={requeue}")


class RefusingReplies(ReplyChannel):
    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.sent: list[bytes] = []

    async def publish(self, body: bytes, correlation_id: str | None, reply_to: str) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append(body)


def server(max_message_bytes: int = 16 * 1024 * 1024) -> RpcServer:
    return RpcServer(
        None,  # type: ignore[arg-type]  # a malformed request reaches neither
        None,  # type: ignore[arg-type]
        RetryPolicy(max_attempts=1, base_ms=1, cap_ms=1),
        url="",
        queue="q",
        durable=True,
        prefetch=1,
        max_body_bytes=1024,
        max_message_bytes=max_message_bytes,
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    "error",
    [
        aiormq.exceptions.ChannelPreconditionFailed("PRECONDITION_FAILED - message size"),
        aiormq.exceptions.ChannelNotFoundEntity("NOT_FOUND - no queue"),
        aiormq.exceptions.DeliveryError(None, aiormq.spec.Basic.Nack(delivery_tag=1)),
    ],
    ids=type,
)
async def test_a_reply_the_broker_refuses_is_logged_and_its_request_acked(error: Exception) -> None:
    request = FakeRequest()
    with capture_logs() as logs:
        await server().handle(RefusingReplies(error), request)  # type: ignore[arg-type]
    assert request.settled == ["ack"], "not requeued: it would be refused again"
    assert [e["event"] for e in logs] == ["rpc.malformed", "rpc.reply_failed"]
    assert logs[-1]["next"] == "acked unanswered"


@pytest.mark.anyio
async def test_a_reply_above_the_broker_limit_is_not_sent_and_its_request_acked() -> None:
    request, replies = FakeRequest(), RefusingReplies(None)
    with capture_logs() as logs:
        await server(max_message_bytes=20).handle(replies, request)  # type: ignore[arg-type]
    assert replies.sent == []
    assert request.settled == ["ack"]
    assert "(STREAMSVC_AMQP_MAX_MESSAGE_BYTES)" in logs[-1]["error"]


@pytest.mark.anyio
async def test_a_lost_connection_while_replying_leaves_the_request_to_the_broker() -> None:
    request = FakeRequest()
    with pytest.raises(ConnectionError):
        await server().handle(RefusingReplies(ConnectionResetError("reset")), request)  # type: ignore[arg-type]
    assert request.settled == []
