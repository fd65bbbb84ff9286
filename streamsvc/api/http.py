"""HTTP: the same operations over JSON, an OpenAPI document and Swagger UI served from local
assets, Prometheus metrics, and liveness/readiness probes.

Errors are RFC 9457 problem documents (``application/problem+json``) naming the field and
the reason, the same words the other paths use.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Annotated, Any

import anyio
import msgspec
import prometheus_client
import uvicorn
from litestar import Litestar, Request, Response, delete, get, post
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import Components, Reference, SecurityScheme
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.static_files import create_static_files_router

from streamsvc import tracing
from streamsvc.actors.ingress import Ingress, Result
from streamsvc.api.console import console_router
from streamsvc.api.swagger import ASSETS_DIR, LocalSwagger
from streamsvc.errors import InvalidOperation
from streamsvc.keys import Authenticator
from streamsvc.model import (
    MAX_COUNT_WINDOW,
    MAX_PAGE,
    CountQuery,
    ListQuery,
    Operation,
    OperationCounts,
    OperationPage,
    OperationView,
    Receipt,
    Rejection,
    Status,
    check_nesting,
    rejection,
)
from streamsvc.ratelimit import Refusal
from streamsvc.schedules import Schedule
from streamsvc.store import PausedType
from streamsvc.validate import Caller

SOURCE = "http"
PROBLEM = "application/problem+json"
ASSETS = "/api/docs/assets"


class FieldError(msgspec.Struct):
    field: str
    reason: str


class Problem(msgspec.Struct, omit_defaults=True):
    """RFC 9457 problem details, with the offending fields."""

    title: str
    status: int
    detail: str
    type: str = "about:blank"
    errors: list[FieldError] = []


class BatchItem(msgspec.Struct, omit_defaults=True, rename="camel"):
    """One operation's result in a bulk submission: a receipt, or why it was refused."""

    index: int
    id: str | None = None
    operation_type: str | None = None
    status: str | None = None
    created: bool | None = None
    error: FieldError | None = None


class ProblemError(Exception):
    def __init__(self, problem: Problem, headers: dict[str, str] | None = None) -> None:
        super().__init__(problem.detail)
        self.problem = problem
        self.headers = headers


def _problem_response(problem: Problem, headers: dict[str, str] | None = None) -> Response[Problem]:
    return Response(problem, status_code=problem.status, media_type=PROBLEM, headers=headers)


def _rate_limited(refusal: Refusal) -> ProblemError:
    """429, with Retry-After when waiting helps; nothing of the request was stored."""
    retry = refusal.retry_after_s
    return ProblemError(
        Problem(
            title="Too many requests",
            status=429,
            detail=f"rate: {refusal.reason}",
            errors=[FieldError("rate", refusal.reason)],
        ),
        headers={"retry-after": str(retry)} if retry is not None else None,
    )


def _refused(rejections: list[Rejection], status: int = 422) -> ProblemError:
    first = rejections[0]
    return ProblemError(
        Problem(
            title="Operation refused",
            status=status,
            detail=first.message,
            errors=[FieldError(r.field, r.reason) for r in rejections],
        )
    )


# How a key travels (caller_of, below): either scheme will do. Declared so that Swagger UI's
# Authorize button sends it with the requests a reader tries.
SECURITY_SCHEMES: dict[str, SecurityScheme | Reference] = {
    "bearer": SecurityScheme(
        type="http", scheme="bearer", description="Authorization: Bearer <key>"
    ),
    "apiKey": SecurityScheme(
        type="apiKey", name="X-API-Key", security_scheme_in="header", description="the API key"
    ),
}

RATE_LIMITED = {
    429: ResponseSpec(
        Problem,
        generate_examples=False,
        description="Over the key's rate of operations per second: nothing was stored; "
        "Retry-After says when to try again (absent when the request alone is too large).",
        media_type=PROBLEM,
    )
}


ADMIN_ONLY = {
    403: ResponseSpec(Problem, description="The key lacks the admin scope", media_type=PROBLEM)
}


class Resumed(msgspec.Struct, rename="camel"):
    operation_type: str
    released: int


def _not_found(operation_id: str) -> ProblemError:
    """Another key's operation is not found, exactly as an unknown id."""
    return ProblemError(
        Problem(
            title="Not found",
            status=404,
            detail=f"no operation with id {operation_id!r}",
            errors=[FieldError("id", "no such operation")],
        )
    )


def create_app(
    ingress: Ingress,
    auth: Authenticator,
    ready: Callable[[], Awaitable[list[str]]],
    *,
    max_body_bytes: int,
    schedules: Sequence[Schedule] = (),
) -> Litestar:
    """The HTTP API over one process's ingress; ``ready`` names the servers that are away;
    the console at /console shows ``schedules`` (STREAMSVC_SCHEDULES) with their runs."""

    def caller_of(request: Request[Any, Any, Any]) -> Caller:
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else None
        key = key or request.headers.get("x-api-key")
        try:
            return auth.caller_for(key)
        except InvalidOperation as exc:
            raise ProblemError(
                Problem(
                    title="Unauthorized",
                    status=401,
                    detail=f"{exc.field}: {exc.reason}",
                    errors=[FieldError(exc.field, exc.reason)],
                )
            ) from None

    @post(
        "/api/operations",
        tags=["operations"],
        before_request=nesting_checked(levels_above=0),
        status_code=201,
        summary="Submit one operation",
        description="201 when stored, 200 when an operation with this userOperationId "
        "exists already (it is not applied twice).",
        responses=RATE_LIMITED,
    )
    async def create_operation(
        data: JSONBody[Operation], request: Request[Any, Any, Any]
    ) -> Response[Receipt]:
        caller = caller_of(request)
        if refusal := await auth.admit(caller, 1):
            raise _rate_limited(refusal)
        with tracing.intake(SOURCE, request.headers) as intake:
            traces = intake.traces(1)
            result = (await ingress.submit([data], caller=caller, source=SOURCE, traces=traces))[0]
            intake.finish([result])
        if isinstance(result, Rejection):
            raise _refused([result])
        return Response(result, status_code=201 if result.created else 200)

    @post(
        "/api/operations/batch",
        tags=["operations"],
        before_request=nesting_checked(levels_above=1),
        status_code=200,
        summary="Submit a list of operations",
        description="Every valid operation is stored; each item says what became of it.",
        responses=RATE_LIMITED,
    )
    async def create_operations(
        data: JSONBody[list[Operation]], request: Request[Any, Any, Any]
    ) -> list[BatchItem]:
        caller = caller_of(request)
        if refusal := await auth.admit(caller, len(data)):  # a list counts its operations
            raise _rate_limited(refusal)
        with tracing.intake(SOURCE, request.headers) as intake:
            traces = intake.traces(len(data))
            results = await ingress.submit(data, caller=caller, source=SOURCE, traces=traces)
            intake.finish(results)
        return [_item(i, r) for i, r in enumerate(results)]

    @get(
        "/api/operations/{operation_id:str}",
        tags=["operations"],
        summary="Look an operation up by id",
        description="By the stored id or the caller's userOperationId. A key sees only the "
        "operations it submitted (an admin key: all); any other answers 404.",
    )
    async def get_operation(
        operation_id: FromPath[str], request: Request[Any, Any, Any]
    ) -> OperationView:
        view = await ingress.get(operation_id, caller=caller_of(request))
        if view is None:
            raise _not_found(operation_id)
        return view

    @get(
        "/api/operations",
        tags=["operations"],
        summary="List operations, newest first",
        description="Filters: status, operationType, since (created at or after), until "
        "(created before); limit (1-1000, default 100). A key sees only its own operations "
        "(an admin key: all). nextCursor, passed back as cursor, gives the next page; null "
        "on the last.",
    )
    async def list_operations(
        request: Request[Any, Any, Any],
        status: FromQuery[Status | None] = None,
        operation_type: Annotated[str | None, QueryParameter(name="operationType")] = None,
        since: FromQuery[dt.datetime | None] = None,
        until: FromQuery[dt.datetime | None] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 100,
        cursor: FromQuery[str | None] = None,
    ) -> OperationPage:
        query = ListQuery(status, operation_type, since, until, limit, cursor)
        return await ingress.list_operations(query, caller=caller_of(request))

    @get(
        "/api/operations/counts",
        tags=["queue"],
        summary="Count operations by status and by operationType",
        description="The operations created in [since, until): how many by status (every "
        "status, zeros included) and by operationType and status. until defaults to now, "
        f"since to a day before until; at most {MAX_COUNT_WINDOW.days} days. A key counts "
        "only its own operations (an admin key: all).",
    )
    async def count_operations(
        request: Request[Any, Any, Any],
        since: FromQuery[dt.datetime | None] = None,
        until: FromQuery[dt.datetime | None] = None,
    ) -> OperationCounts:
        return await ingress.count_operations(CountQuery(since, until), caller=caller_of(request))

    @delete(
        "/api/operations/{operation_id:str}",
        tags=["operations"],
        status_code=200,
        summary="Cancel an operation not yet applied",
        description="By the stored id or the caller's userOperationId. The operation ends "
        "CANCELLED and is never applied, even when a flusher holds it already; cancelling it "
        "again answers the same. One that finished (SUCCESS or FAIL) answers 409; another "
        "key's, or an unknown id, 404.",
        responses={
            404: ResponseSpec(Problem, description="No such operation", media_type=PROBLEM),
            409: ResponseSpec(
                Problem, description="Finished already: cannot be cancelled", media_type=PROBLEM
            ),
        },
    )
    async def cancel_operation(
        operation_id: FromPath[str], request: Request[Any, Any, Any]
    ) -> OperationView:
        result = await ingress.cancel(operation_id, caller=caller_of(request))
        view = result.view
        if view is None:
            raise _not_found(operation_id)
        if result.verdict == "finished":
            why = f"finished as {view.status}: it cannot be cancelled"
            raise ProblemError(
                Problem(
                    title="Conflict",
                    status=409,
                    detail=f"operation {operation_id!r} {why}",
                    errors=[FieldError("status", why)],
                )
            )
        return view

    @post(
        "/api/operations/{operation_id:str}/retry",
        tags=["operations"],
        status_code=200,
        summary="Replay an operation that ended FAIL or CANCELLED",
        description="By the stored id or the caller's userOperationId. The operation is "
        "pending again under the same id: its attempts keep counting, and how it ended is "
        "kept in its history; it is applied at most once, however often it is retried. "
        "One that succeeded or has not finished answers 409; another key's, or an unknown "
        "id, 404. A retry counts against the key's rate.",
        responses={
            404: ResponseSpec(Problem, description="No such operation", media_type=PROBLEM),
            409: ResponseSpec(
                Problem,
                description="Succeeded (never applied twice), or not finished",
                media_type=PROBLEM,
            ),
            **RATE_LIMITED,
        },
    )
    async def retry_operation(
        operation_id: FromPath[str], request: Request[Any, Any, Any]
    ) -> OperationView:
        caller = caller_of(request)
        if refusal := await auth.admit(caller, 1):
            raise _rate_limited(refusal)
        result = await ingress.manage.retry(operation_id, caller=caller)
        view = result.view
        if view is None:
            raise _not_found(operation_id)
        if result.verdict != "replayed":
            why = result.why_not
            detail = f"operation {operation_id!r} cannot be retried: {why}"
            raise ProblemError(
                Problem(
                    title="Conflict",
                    status=409,
                    detail=detail,
                    errors=[FieldError("status", why)],
                )
            )
        return view

    def admin_of(request: Request[Any, Any, Any]) -> Caller:
        caller = caller_of(request)
        if not caller.admin:
            raise ProblemError(
                Problem(
                    title="Forbidden",
                    status=403,
                    detail="key: needs the admin scope",
                    errors=[FieldError("key", "needs the admin scope")],
                )
            )
        return caller

    @post(
        "/api/types/{operation_type:str}/pause",
        tags=["queue"],
        status_code=200,
        summary="Pause an operationType (admin keys)",
        description="Its operations are still accepted and stored; once this answers, none "
        "is applied until it is resumed. Pausing a paused type answers the same.",
        responses=ADMIN_ONLY,
    )
    async def pause_type(
        operation_type: FromPath[str], request: Request[Any, Any, Any]
    ) -> PausedType:
        caller = admin_of(request)
        return await ingress.manage.pause(operation_type, by=caller.name)

    @post(
        "/api/types/{operation_type:str}/resume",
        tags=["queue"],
        status_code=200,
        summary="Resume an operationType (admin keys)",
        description="Its operations held while it was paused go to the flushers in the order "
        "they were stored; released says how many.",
        responses=ADMIN_ONLY,
    )
    async def resume_type(
        operation_type: FromPath[str], request: Request[Any, Any, Any]
    ) -> Resumed:
        admin_of(request)
        return Resumed(operation_type, await ingress.manage.resume(operation_type))

    @get(
        "/api/types/paused",
        tags=["queue"],
        summary="The paused operationTypes (admin keys)",
        description="Who paused each, when, and how many operations it holds back.",
        responses=ADMIN_ONLY,
    )
    async def paused_types(request: Request[Any, Any, Any]) -> list[PausedType]:
        admin_of(request)
        return await ingress.manage.paused_types()

    @get("/metrics", include_in_schema=False, media_type=prometheus_client.CONTENT_TYPE_LATEST)
    async def metrics() -> bytes:
        return prometheus_client.generate_latest()

    @get("/healthz", tags=["health"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @get(
        "/readyz",
        tags=["health"],
        summary="PostgreSQL and Redis answer",
        description="503 naming the servers that do not; why is logged, never answered.",
    )
    async def readyz() -> Response[dict[str, Any]]:
        """503 naming the servers that are down; why is logged, never answered."""
        down = await ready()
        if down:
            return Response({"status": "unavailable", "down": down}, status_code=503)
        return Response({"status": "ready"})

    assets = create_static_files_router(
        path=ASSETS, directories=[ASSETS_DIR], include_in_schema=False
    )
    swagger = LocalSwagger(path="/docs", assets=ASSETS)
    return Litestar(
        [
            create_operation,
            create_operations,
            get_operation,
            list_operations,
            count_operations,
            cancel_operation,
            retry_operation,
            pause_type,
            resume_type,
            paused_types,
            metrics,
            healthz,
            readyz,
            assets,
            console_router(ingress, admin_of, schedules),
        ],
        openapi_config=OpenAPIConfig(
            title="streamsvc",
            version="1",
            path="/api",
            render_plugins=[swagger],
            components=Components(security_schemes=SECURITY_SCHEMES),
            security=[{name: []} for name in SECURITY_SCHEMES],
            description="Batch Service: operations stored, applied in batches, exactly once.",
        ),
        exception_handlers={
            ProblemError: lambda _, exc: _problem_response(exc.problem, exc.headers),
            # A refused request (a filter, a body nested too deeply, an operationType): 422
            # naming the field; an unknown key is answered 401 before (caller_of).
            InvalidOperation: lambda _, exc: _problem_response(
                _refused([Rejection(exc.field, exc.reason)]).problem
            ),
            ValidationException: _validation_problem,
            HTTPException: lambda _, exc: _http_problem(exc, max_body_bytes),
        },
        request_max_body_size=max_body_bytes,
        debug=False,
        logging_config=None,  # its loggers go through the root logger (streamsvc.logs)
    )


def nesting_checked(levels_above: int) -> Callable[[Request[Any, Any, Any]], Awaitable[None]]:
    """A before-request hook refusing a body nested too deeply, before Litestar decodes it
    with msgspec. Reading the body enforces request_max_body_size first (on the bytes
    received, chunked bodies too); Litestar then decodes the same cached bytes."""

    async def check(request: Request[Any, Any, Any]) -> None:
        check_nesting(await request.body(), levels_above=levels_above)

    return check


def _item(index: int, result: Result) -> BatchItem:
    if isinstance(result, Rejection):
        return BatchItem(index, error=FieldError(result.field, result.reason))
    return BatchItem(index, result.id, result.operation_type, result.status.value, result.created)


def _validation_problem(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Problem]:
    """Litestar decoded the body with msgspec; name the fields as the other paths do."""
    errors = []
    for extra in exc.extra if isinstance(exc.extra, list) else []:
        key = str(extra.get("key", ""))
        named = rejection(str(extra.get("message", "")), "" if key == "data" else key)
        errors.append(FieldError(named.field, named.reason))
    if not errors:
        errors = [FieldError("body", _lower(exc.detail))]
    first = errors[0]
    return _problem_response(
        Problem(
            title="Operation refused",
            status=422,
            detail=f"{first.field}: {first.reason}",
            errors=errors,
        )
    )


def _http_problem(exc: HTTPException, max_body_bytes: int) -> Response[Problem]:
    status = exc.status_code
    detail = _lower(exc.detail)
    if status == 413:
        detail = f"larger than the {max_body_bytes} bytes allowed"
    if status == 400:  # the body could not be read (not JSON, cut short, empty): refused
        status = 422
        return _problem_response(
            Problem(
                title="Operation refused",
                status=status,
                detail=f"body: {detail}",
                errors=[FieldError("body", detail)],
            )
        )
    errors = [FieldError("body", detail)] if status == 413 else []
    return _problem_response(
        Problem(title=_title(status), status=status, detail=detail, errors=errors)
    )


def _title(status: int) -> str:
    return {413: "Request body too large", 404: "Not found", 405: "Method not allowed"}.get(
        status, "Request failed"
    )


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


class Server(uvicorn.Server):
    """uvicorn inside the service's task group: the supervisor owns the signals.
    ``listening`` is set once its port takes connections."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = anyio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.listening.set()


def server(app: Litestar, *, host: str, port: int) -> Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
        server_header=False,
    )
    return Server(config)
