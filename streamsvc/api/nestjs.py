"""The NestJS RMQ wire format, and the old service's response shape (``IResponse``).

A request is ``{"pattern": ..., "data": ..., "id": ...}``; the reply a body of exactly
``{"response": ..., "isDisposed": true}`` or ``{"err": ..., "isDisposed": true}``. The
responses keep the old service's ``{status, message, data?, error?, errorCode?}``; the
error codes are VALIDATION_ERROR, UNAUTHORIZED, RATE_LIMITED, NOT_FOUND and
INTERNAL_ERROR.
"""

from __future__ import annotations

from typing import Any

import msgspec

from streamsvc.actors.ingress import Result
from streamsvc.model import Rejection
from streamsvc.ratelimit import Refusal

NO_HANDLER = "There is no matching message handler defined in the remote service."


class Request(msgspec.Struct):
    """The NestJS packet; other keys newer clients add (e.g. ``metadata``) are ignored."""

    pattern: Any
    data: msgspec.Raw = msgspec.Raw(b"null")
    id: str | None = None


class IResponse(msgspec.Struct, omit_defaults=True, rename="camel"):
    """The old service's response shape."""

    status: bool
    message: str
    data: Any = msgspec.UNSET
    error: str | msgspec.UnsetType = msgspec.UNSET
    error_code: str | msgspec.UnsetType = msgspec.UNSET


class Reply(msgspec.Struct, rename="camel"):
    response: Any
    is_disposed: bool = True


class ErrorReply(msgspec.Struct, rename="camel"):
    err: Any
    is_disposed: bool = True


class NoHandler(msgspec.Struct):
    id: str | None
    err: str = NO_HANDLER
    status: str = "error"


class OperationRef(msgspec.Struct, rename="camel"):
    id: str | None = None
    user_operation_id: str | None = None


request_decoder = msgspec.json.Decoder(Request)
ref_decoder = msgspec.json.Decoder(OperationRef | str)
_encoder = msgspec.json.Encoder()


def route_key(pattern: Any) -> str:
    """NestJS's key for a pattern: a string as is, an object as sorted compact JSON."""
    if isinstance(pattern, str):
        return pattern
    return _encoder.encode(_sorted(pattern)).decode()


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    return value


def result_data(result: Result) -> Any:
    if isinstance(result, Rejection):
        return {"index": result.index, "field": result.field, "reason": result.reason}
    return result


def created(result: Result) -> IResponse:
    if isinstance(result, Rejection):
        return refused(result)
    message = "Operation created" if result.created else "Operation already exists"
    return IResponse(status=True, message=message, data=result)


def refused(rejection: Rejection) -> IResponse:
    return IResponse(
        status=False,
        message="Operation refused",
        error=rejection.message,
        error_code="VALIDATION_ERROR",
        data={"field": rejection.field, "reason": rejection.reason},
    )


def not_found() -> IResponse:
    """Unknown, or another key's (the same answer: ids of others are not disclosed)."""
    return IResponse(
        status=False,
        message="Operation not found",
        error="Operation not found",
        data=None,
        error_code="NOT_FOUND",
    )


def internal_error() -> IResponse:
    return IResponse(
        status=False,
        message="Internal error",
        error="the request could not be handled; nothing of it was stored",
        error_code="INTERNAL_ERROR",
    )


def rate_limited(refusal: Refusal) -> IResponse:
    return IResponse(
        status=False,
        message="Rate limited",
        error=f"rate: {refusal.reason}",
        error_code="RATE_LIMITED",
        data={"retryAfterS": refusal.retry_after_s},
    )


def unauthorized() -> IResponse:
    return IResponse(
        status=False,
        message="Unauthorized",
        error="key: a valid API key is required",
        error_code="UNAUTHORIZED",
    )
