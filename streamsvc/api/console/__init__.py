"""The operations console at /console: a page for operators, served by the service itself.

No build step and nothing from the internet: ``GET /console`` is a static HTML shell with one
stylesheet and one small script from this package (``assets/``). The script asks for an
admin key, keeps it in sessionStorage and sends it only in the ``X-API-Key`` header: to the
fragments below, which answer server-rendered HTML (Jinja2, autoescaped: every operationType,
error, id and meta a caller sent is untrusted), and to the JSON API's own retry, cancel,
pause and resume routes. Nothing here changes anything: the console's buttons call the API
every other client calls, under the same checks.

The responses carry a strict Content-Security-Policy (no inline script, nothing from
elsewhere) and are never cached or framed. docs/console.md has the design notes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from litestar import MediaType, Request, Response, Router, get
from litestar.datastructures import CacheControlHeader
from litestar.params import FromQuery, QueryParameter
from litestar.static_files import create_static_files_router

from streamsvc.actors.ingress import Ingress
from streamsvc.api.console import views
from streamsvc.errors import InvalidOperation
from streamsvc.model import CountQuery, ListQuery, OperationPage, Status
from streamsvc.schedules import Schedule, next_tick
from streamsvc.validate import Caller

HERE = Path(__file__).parent
PATH = "/console"
PAGE = 25  # operations per page of the list
FAILURES = 10

# 'none' by default, then only this origin's script, stylesheet and fetches: an injected
# tag or attribute could neither run nor load anything, nor send a form anywhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
}

AdminOf = Callable[[Request[Any, Any, Any]], Caller]


def _secured(response: Response[Any]) -> Response[Any]:
    response.headers.update(HEADERS)
    response.headers.setdefault("cache-control", "no-store")  # the assets say no-cache
    return response


def console_router(ingress: Ingress, admin_of: AdminOf, schedules: Sequence[Schedule]) -> Router:
    """The console's routes over ``ingress``; ``admin_of`` authenticates a request's key
    and refuses any but an admin's (401, 403), as the API's admin routes do."""
    templates = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    templates.filters["stamp"] = views.stamp
    templates.globals["actions"] = views.actions
    templates.globals["body"] = views.body

    def html(template: str, **context: Any) -> Response[str]:
        body = templates.get_template(template).render(**context)
        return Response(body, media_type=MediaType.HTML)

    @get("/")
    async def page() -> Response[str]:
        """The shell: no data and no key needed; the script fills it in."""
        return html(
            "page.html", windows=views.WINDOWS, default=views.DEFAULT_WINDOW, statuses=Status
        )

    @get("/parts/overview")
    async def overview(
        request: Request[Any, Any, Any], window: FromQuery[str | None] = None
    ) -> Response[str]:
        caller = admin_of(request)
        now = dt.datetime.now(dt.UTC)
        name, since = views.window(window, now)
        counts = await ingress.count_operations(CountQuery(since, now), caller=caller)
        minutes = await ingress.store.throughput(views.THROUGHPUT_MINUTES)
        paused = {p.operation_type for p in await ingress.manage.paused_types()}
        types = sorted(counts.by_type.items(), key=lambda item: (-sum(item[1].values()), item[0]))
        return html(
            "overview.html",
            window=views.WINDOWS[name][0],
            counts=counts,
            types=types,
            paused=paused,
            statuses=list(Status),
            chart=views.chart(minutes),
            minutes=views.THROUGHPUT_MINUTES,
        )

    @get("/parts/failures")
    async def failures(request: Request[Any, Any, Any]) -> Response[str]:
        caller = admin_of(request)
        query = ListQuery(status=Status.FAIL, limit=FAILURES)
        listed = await ingress.list_operations(query, caller=caller)
        return html("failures.html", items=listed.items)

    @get("/parts/operations")
    async def operations(
        request: Request[Any, Any, Any],
        status: FromQuery[Status | None] = None,
        operation_type: Annotated[str | None, QueryParameter(name="operationType")] = None,
        op_id: Annotated[str | None, QueryParameter(name="id")] = None,
        cursor: FromQuery[str | None] = None,
    ) -> Response[str]:
        caller = admin_of(request)
        if op_id:
            view = await ingress.get(op_id.strip(), caller=caller)
            found = OperationPage([view] if view else [], None)
            return html("operations.html", page=found, searched=op_id, problem=None, paged=False)
        query = ListQuery(status, operation_type or None, limit=PAGE, cursor=cursor)
        try:
            listed = await ingress.list_operations(query, caller=caller)
        except InvalidOperation as exc:  # a filter no operation could match, a foreign cursor
            empty = OperationPage([], None)
            problem = f"{exc.field}: {exc.reason}"
            return html("operations.html", page=empty, searched=None, problem=problem, paged=False)
        return html(
            "operations.html", page=listed, searched=None, problem=None, paged=cursor is not None
        )

    @get("/parts/paused")
    async def paused(request: Request[Any, Any, Any]) -> Response[str]:
        admin_of(request)
        return html("paused.html", paused=await ingress.manage.paused_types())

    @get("/parts/schedules")
    async def recurring(request: Request[Any, Any, Any]) -> Response[str]:
        admin_of(request)
        last = await ingress.store.last_ticks() if schedules else {}
        now = dt.datetime.now(dt.UTC)
        rows = [(s, last.get(s.name), next_tick(s, now)) for s in schedules]
        return html("schedules.html", rows=rows, now=now, ago=views.ago)

    assets = create_static_files_router(
        path="/assets",
        directories=[HERE / "assets"],
        include_in_schema=False,
        cache_control=CacheControlHeader(no_cache=True),  # revalidated: a new version shows
    )
    return Router(
        PATH,
        route_handlers=[page, overview, failures, operations, paused, recurring, assets],
        after_request=_secured,
        include_in_schema=False,
    )
