"""RabbitMQ RPC, wire-compatible with the NestJS ``@nestjs/microservices`` RMQ transport.

A request is ``{"pattern": ..., "data": ..., "id": ...}`` on BATCH_SERVICE_RMQ_QUEUE with
``replyTo`` and ``correlationId``; the reply goes to ``replyTo`` with the same
correlationId and a body of exactly ``{"response": ..., "isDisposed": true}`` or
``{"err": ..., "isDisposed": true}``. A body without ``id`` is an event: handled, never
answered. Responses keep the old service's IResponse shape (``streamsvc.api.nestjs``).

Messages are acked manually: after the operation is durable in PostgreSQL, or after the
error reply for refused input. When PostgreSQL cannot take it, the message is returned to
the queue after a pause, so nothing is lost and the caller's request is answered later.

Replies go on a channel of their own. A reply the broker refuses (one above its
max_message_size is not even sent: STREAMSVC_AMQP_MAX_MESSAGE_BYTES) closes that channel, not
the one the requests come on: the request is acked unanswered, as one whose replyTo is gone,
instead of returning to the queue to be refused again, and the next reply opens a new channel.
Replies are not confirmed, so the few sent between the refused one and the broker's close are
lost with it; their callers time out.
"""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiormq
import anyio
import msgspec
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection

from streamsvc import tracing
from streamsvc.actors.ingress import Ingress, Result
from streamsvc.adapters import amqp
from streamsvc.adapters.deliveries import Delivery, consume
from streamsvc.adapters.postgres import translate
from streamsvc.api import nestjs
from streamsvc.errors import InvalidOperation, TransientError
from streamsvc.keys import Authenticator
from streamsvc.model import (
    MAX_DEPTH,
    CountQuery,
    ListQuery,
    Receipt,
    Rejection,
    decode_error,
    decode_operation,
    decode_operations,
    derived_id,
    field_of,
    too_deep,
)
from streamsvc.policy import RetryPolicy
from streamsvc.validate import Caller

log = structlog.get_logger("streamsvc.rpc")

SOURCE = "rpc"
_encoder = msgspec.json.Encoder()

Handler = Callable[[bytes, Caller, str | None], Awaitable[nestjs.IResponse]]
T = TypeVar("T")
_TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels"
_NAMESPACE = uuid.UUID("0b7d3f4e-58a4-4d1b-9a3e-2f7c5d1e9a60")


# Why a retry changed nothing, as an errorCode.
_NOT_RETRIED = {"succeeded": "SUCCEEDED", "pending": "NOT_FINISHED"}


class Unavailable(Exception):
    """The store could not take the request now; it goes back to the queue."""


class RpcServer:
    def __init__(
        self,
        ingress: Ingress,
        auth: Authenticator,
        retry: RetryPolicy,
        *,
        url: str,
        queue: str,
        durable: bool,
        prefetch: int,
        max_body_bytes: int,
        max_message_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.ingress = ingress
        self.auth = auth
        self.retry = retry
        self.url = url
        self.queue = queue
        self.durable = durable
        self.prefetch = prefetch
        self.max_body_bytes = max_body_bytes
        self.max_message_bytes = max_message_bytes
        self.stopping = anyio.Event()
        self._consuming = anyio.CancelScope()
        self.handlers: dict[str, Handler] = {
            "create_operation": self.create_operation,
            "createOperation": self.create_operation,
            "create_operations": self.create_operations,
            "get_operation": self.get_operation,
            "getOperation": self.get_operation,
            "cancel_operation": self.cancel_operation,
            "cancelOperation": self.cancel_operation,
            "retry_operation": self.retry_operation,
            "retryOperation": self.retry_operation,
            "list_operations": self.list_operations,
            "listOperations": self.list_operations,
            "count_operations": self.count_operations,
            "countOperations": self.count_operations,
        }

    async def run(self) -> None:
        await amqp.serve(self.url, self.retry, self._session, who="rpc", stopping=self.stopping)

    def stop(self) -> None:
        """Stop taking messages; those being handled finish, the rest go back to the queue."""
        self.stopping.set()
        self._consuming.cancel()

    async def _session(self, connection: AbstractConnection) -> None:
        """Consume until the connection drops or we stop; in-flight messages finish."""
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=self.prefetch)
        queue = await channel.declare_queue(self.queue, durable=self.durable)
        replies = ReplyChannel(connection)
        log.info("rpc.consuming", queue=self.queue, durable=self.durable)
        handle = functools.partial(self.handle, replies)
        try:
            with anyio.CancelScope() as self._consuming:
                if self.stopping.is_set():
                    return
                await consume(channel, queue.name, handle)  # raises when the consumer ends
        except amqp.CONNECTION_EXCEPTIONS:
            if not self.stopping.is_set():
                raise
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await replies.close()

    async def handle(self, replies: ReplyChannel, message: Delivery) -> None:
        """Answer one request (or handle one event), then ack it.

        Nothing a caller sends escapes from here: whatever fails is answered INTERNAL_ERROR
        and acked, so the next message is served. Only a lost connection (the message
        returns to the queue by itself) or a store that is away (returned after a pause)
        leaves a message unacked."""
        try:
            answer = await self._answer(message)
        except Unavailable as exc:
            delay = self.retry.backoff_s(1 + (message.redelivered or 0))
            log.warning(
                "rpc.store_unavailable",
                error=str(exc),
                next=f"returning the message to the queue in {delay:.1f} s",
            )
            await anyio.sleep(delay)
            await message.nack(requeue=True)
            return
        except amqp.CONNECTION_EXCEPTIONS:
            raise
        except Exception as exc:
            log.exception(
                "rpc.handler_failed", error=type(exc).__name__, next="answered INTERNAL_ERROR"
            )
            answer = nestjs.Reply(nestjs.internal_error())
        if answer is not None:
            await self._reply(replies, message, answer)
        try:
            await message.ack()
        except Exception as exc:  # aiormq fails a cut connection's pending acks with bare errors
            log.warning(
                "rpc.ack_lost",
                error=str(exc) or type(exc).__name__,
                next="the broker hands the request out again; its operations are stored once",
            )

    async def _answer(self, message: Delivery) -> msgspec.Struct | None:
        """What to answer ``message`` with (None: nothing, it is an event). Its size and
        nesting are checked before anything of it is decoded."""
        body = message.body
        if len(body) > self.max_body_bytes:
            rejection = Rejection("body", f"larger than the {self.max_body_bytes} bytes allowed")
            log.warning("rpc.refused", error=rejection.message)
            return nestjs.Reply(nestjs.refused(rejection))  # no id: answered if replyTo
        # The envelope holds the operation(s) one or two levels down.
        path = too_deep(body, MAX_DEPTH + 2)
        if path is not None and path[:1] == ["data"]:
            in_list = 1 if len(path) > 1 and isinstance(path[1], int) else 0  # a list of ops
            return nestjs.Reply(nestjs.refused(Rejection(field_of(path[1:], in_list), _TOO_DEEP)))
        try:
            if path is not None:
                raise InvalidOperation(field_of(path), _TOO_DEEP)
            request = nestjs.request_decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError, InvalidOperation) as exc:
            log.warning("rpc.malformed", error=str(exc))
            return nestjs.ErrorReply(f"malformed request: {exc}")
        key = nestjs.route_key(request.pattern)
        handler = self.handlers.get(key)
        if handler is None:
            log.warning("rpc.no_handler", pattern=key[:200])
            return None if request.id is None else nestjs.NoHandler(request.id)
        caller = self._caller(message, request)
        if caller is None:
            response = nestjs.unauthorized()
        else:
            with tracing.caller(message.headers):  # the parent of the request's spans
                response = await _answering_refusals(handler(request.data, caller, request.id))
        if request.id is None:
            if not response.status:
                log.warning("rpc.event_refused", pattern=key[:200], error=response.error)
            return None
        return nestjs.Reply(response)

    def _caller(self, message: Delivery, request: nestjs.Request) -> Caller | None:
        """The caller by header ``x-api-key`` or ``data.apiKey``; None when refused."""
        header = (message.headers or {}).get("x-api-key")
        key = header.decode(errors="replace") if isinstance(header, bytes | bytearray) else header
        if key is None:
            key = _api_key_in(request.data)
        try:
            return self.auth.caller_for(key if isinstance(key, str) else None)
        except InvalidOperation:
            return None

    async def _reply(self, replies: ReplyChannel, message: Delivery, body: msgspec.Struct) -> None:
        """Send the reply if it can go; the caller acks ``message`` either way, unless the
        connection is lost."""
        if not message.reply_to:
            return
        encoded = _encoder.encode(body)
        if len(encoded) > self.max_message_bytes:
            log.warning(
                "rpc.reply_failed",
                error=f"reply of {len(encoded)} bytes, above the {self.max_message_bytes} "
                "allowed (STREAMSVC_AMQP_MAX_MESSAGE_BYTES)",
                next="acked unanswered",
            )
            return
        try:
            await replies.publish(encoded, message.correlation_id, message.reply_to)
        except amqp.REFUSALS as exc:  # the broker's close of the reply channel, seen here
            log.warning("rpc.reply_failed", error=str(exc)[:200], next="acked unanswered")
        except amqp.CONNECTION_EXCEPTIONS:
            raise
        except Exception as exc:  # e.g. a replyTo beyond AMQP's 255 bytes: cannot answer
            log.warning("rpc.reply_failed", error=str(exc)[:200], next="acked unanswered")

    # -- patterns ------------------------------------------------------------------------
    async def create_operation(
        self, data: bytes, caller: Caller, request_id: str | None
    ) -> nestjs.IResponse:
        op = _decode_ops(decode_operation, data)
        results = await self._submit([op], caller, request_id)
        return nestjs.created(results[0])

    async def create_operations(
        self, data: bytes, caller: Caller, request_id: str | None
    ) -> nestjs.IResponse:
        ops = _decode_ops(decode_operations, data)
        results = await self._submit(ops, caller, request_id)
        refused = sum(isinstance(r, Rejection) for r in results)
        created = sum(isinstance(r, Receipt) and r.created for r in results)
        return nestjs.IResponse(
            status=refused == 0,
            message=f"{created} created, {len(ops) - created - refused} existing, "
            f"{refused} refused",
            data=[nestjs.result_data(r) for r in results],
            error_code="VALIDATION_ERROR" if refused else msgspec.UNSET,
        )

    async def get_operation(
        self, data: bytes, caller: Caller, request_id: str | None
    ) -> nestjs.IResponse:
        op_id = self._operation_id(data)
        view = await _answer(self.ingress.get(op_id, caller=caller))  # another key's: None
        if view is None:
            return nestjs.not_found()
        return nestjs.IResponse(status=True, message="Operation found", data=view)

    async def cancel_operation(
        self, data: bytes, caller: Caller, request_id: str | None
    ) -> nestjs.IResponse:
        """``{id}`` (or the id alone): the operation ends CANCELLED unless it finished."""
        op_id = self._operation_id(data)
        result = await _answer(self.ingress.cancel(op_id, caller=caller))
        view = result.view
        if view is None:
            return nestjs.not_found()
        if result.verdict == "finished":
            message = f"Operation finished as {view.status}: it cannot be cancelled"
            return nestjs.IResponse(
                status=False, message=message, error=message, data=view, error_code="FINISHED"
            )
        return nestjs.IResponse(status=True, message="Operation cancelled", data=view)

    async def retry_operation(
        self, data: bytes, caller: Caller, request_id: str | None
    ) -> nestjs.IResponse:
        """``{id}`` (or the id alone): an operation that ended FAIL or CANCELLED is pending
        again under the same id (docs/queue.md); one that succeeded or has not finished
        answers SUCCEEDED or NOT_FINISHED. A retry counts against the key's rate."""
        op_id = self._operation_id(data)
        if refusal := await self.auth.admit(caller, 1):
            raise _Refusal(nestjs.rate_limited(refusal))
        result = await _answer(self.ingress.manage.retry(op_id, caller=caller))
        view = result.view
        if view is None:
            return nestjs.not_found()
        if result.verdict == "replayed":
            return nestjs.IResponse(status=True, message="Operation replayed", data=view)
        message = f"Operation cannot be retried: {result.why_not}"
        return nestjs.IResponse(
            status=False,
            message=message,
            error=message,
            data=view,
            error_code=_NOT_RETRIED[result.verdict],
        )

    async def list_operations(
        self, data: bytes, caller: Caller, request_id: str | None
    ) -> nestjs.IResponse:
        """``{status?, operationType?, since?, until?, limit?, cursor?}`` (or nothing): a
        page ``{items, nextCursor}``, newest first, of the caller's own operations (an
        admin's: everyone's)."""
        query = ListQuery() if bytes(data) in (b"null", b"") else _decode(_list_decoder, data)
        page = await _answer(self.ingress.list_operations(query, caller=caller))
        return nestjs.IResponse(status=True, message=f"{len(page.items)} operations", data=page)

    async def count_operations(
        self, data: bytes, caller: Caller, request_id: str | None
    ) -> nestjs.IResponse:
        """``{since?, until?}`` (or nothing): ``{since, until, byStatus, byType}``, the
        caller's own operations (an admin's: everyone's) created in [since, until)."""
        query = CountQuery() if bytes(data) in (b"null", b"") else _decode(_count_decoder, data)
        counts = await _answer(self.ingress.count_operations(query, caller=caller))
        total = sum(counts.by_status.values())
        return nestjs.IResponse(status=True, message=f"{total} operations", data=counts)

    def _operation_id(self, data: bytes) -> str:
        ref = _decode(nestjs.ref_decoder, data)
        op_id = ref if isinstance(ref, str) else ref.id or ref.user_operation_id
        if not op_id:
            raise _Refusal(nestjs.refused(Rejection("id", "give the operation's id")))
        return op_id

    async def _submit(self, ops: list[Any], caller: Caller, request_id: str | None) -> list[Result]:
        """Store ``ops``. Operations without a userOperationId get ids derived from the
        request id, so a request redelivered after a lost ack is not stored twice. Over the
        caller's rate limit nothing is stored and the answer is RATE_LIMITED."""
        if refusal := await self.auth.admit(caller, len(ops)):
            raise _Refusal(nestjs.rate_limited(refusal))
        ids: list[str | None] | None = None
        if request_id is not None:
            ids = [derived_id(_NAMESPACE, f"{request_id}:{i}") for i in range(len(ops))]
        with tracing.intake(SOURCE) as intake:  # a child of the request's (``_answer``)
            try:
                results = await self.ingress.submit(
                    ops, caller=caller, source=SOURCE, ids=ids, traces=intake.traces(len(ops))
                )
            except Exception as exc:
                error = translate(exc)
                if isinstance(error, TransientError):
                    raise Unavailable(str(error)) from exc
                raise  # answered INTERNAL_ERROR: a request that cannot be stored is not retried
            intake.finish(results)
        return results


class ReplyChannel:
    """The channel replies go on, opened again at the next reply once the broker closed it.

    Replies are answers to a waiting caller, not records: no publisher confirms."""

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self.channel: AbstractChannel | None = None
        self._raw: aiormq.Channel | None = None
        self._opening = anyio.Lock()

    async def publish(self, body: bytes, correlation_id: str | None, reply_to: str) -> None:
        async with self._opening:
            if self.channel is None or self.channel.is_closed:
                self.channel = await amqp.open_channel(self.connection, confirms=False)
                self.channel.close_callbacks.add(_closed)
                self._raw = await amqp.underlay(self.channel)
            raw = self._raw
        assert raw is not None
        # Not mandatory: with direct reply-to (amq.rabbitmq.reply-to.*, NestJS's default) the
        # broker would also return every mandatory reply to us as unroutable. Published on
        # aiormq's channel underneath: no aio-pika Message per reply (adapters.deliveries).
        # Queued for aiormq's writer, not waited for: an unconfirmed reply is lost with the
        # connection either way, and the request's ack goes after it on the same writer.
        properties = aiormq.spec.Basic.Properties(correlation_id=correlation_id)
        await raw.basic_publish(body, routing_key=reply_to, properties=properties, wait=False)

    async def close(self) -> None:
        if self.channel is not None:
            with contextlib.suppress(*amqp.CONNECTION_EXCEPTIONS, *amqp.REFUSALS):
                await self.channel.close()


def _closed(_: object, exc: BaseException | None) -> None:
    """The broker closed the reply channel, most often over a reply it refused."""
    if amqp.closed_by_broker(exc):
        log.warning("rpc.reply_refused", error=str(exc)[:200], next="a new reply channel")


class _KeyIn(msgspec.Struct, rename="camel"):
    api_key: Any = None


_key_in_decoder = msgspec.json.Decoder(_KeyIn)


def _api_key_in(data: bytes) -> Any:
    """``data.apiKey``, without building the rest of ``data``."""
    try:
        return _key_in_decoder.decode(data).api_key
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


class _Refusal(Exception):
    """A request that is answered with an error response instead of being handled."""

    def __init__(self, response: nestjs.IResponse) -> None:
        super().__init__(response.error)
        self.response = response


class _ListRequest(ListQuery, kw_only=True):
    """A list's filters as RPC carries them: the caller's key may travel in the data."""

    api_key: str | None = None


_list_decoder = msgspec.json.Decoder(_ListRequest)


class _CountRequest(CountQuery, kw_only=True):
    """A count's window as RPC carries it, with the caller's key perhaps."""

    api_key: str | None = None


_count_decoder = msgspec.json.Decoder(_CountRequest)


def _decode(decoder: msgspec.json.Decoder[T], data: bytes) -> T:
    try:
        return decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _Refusal(nestjs.refused(decode_error(exc))) from None


def _decode_ops(decode: Callable[[bytes], T], data: bytes) -> T:
    try:
        return decode(bytes(data))  # data is a msgspec.Raw view into the request
    except InvalidOperation as exc:
        raise _Refusal(nestjs.refused(Rejection(exc.field, exc.reason))) from None


async def _answering_refusals(handling: Awaitable[nestjs.IResponse]) -> nestjs.IResponse:
    try:
        return await handling
    except _Refusal as refusal:
        return refusal.response


async def _answer(asked: Awaitable[T]) -> T:
    """What a request asked for: a refusal of its data answers VALIDATION_ERROR naming the
    field; any other failure (a server away) leaves the request to be handled again."""
    try:
        return await asked
    except InvalidOperation as exc:
        raise _Refusal(nestjs.refused(Rejection(exc.field, exc.reason))) from None
    except Exception as exc:
        raise Unavailable(str(translate(exc))) from exc
