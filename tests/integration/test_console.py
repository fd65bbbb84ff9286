"""The operations console's routes on the real servers: what each fragment shows, who may
read it, the headers that keep the page to itself, and hostile values rendered inert."""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import pytest

from streamsvc.api.console import CSP
from tests.conftest import keyed_settings, make_settings
from tests.pipeline import Served, eventually, order, served_with_clients

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PARTS = ["overview", "failures", "operations", "paused", "schedules"]
HOSTILE = ['<script>alert("t")</script>', '"><img src=x onerror=alert(1)>']


async def keys(served: Served) -> tuple[str, str]:
    """An admin key and a key without the admin scope."""
    store = served.service.keys
    assert store is not None
    admin = await store.create(
        served.db, "ops", tables=None, actions=["insert"], allow_sql=False, admin=True
    )
    plain = await store.create(served.db, "web", tables=None, actions=["insert"], allow_sql=False)
    await store.load(served.db)
    return admin, plain


async def status_of(served: Served, op_id: str) -> str:
    status = await served.db.fetchval(
        'SELECT status FROM "BatchOperations" WHERE id = $1::uuid', op_id
    )
    return str(status)


async def ended(served: Served, op_id: str, status: str) -> None:
    async def there() -> bool:
        return await status_of(served, op_id) == status

    await eventually(there, within=20)


async def test_fragments_need_an_admin_key_in_the_header(database: str, prefix: str) -> None:
    async with served_with_clients(keyed_settings(database, prefix)) as served:
        admin, plain = await keys(served)
        http = served.http
        for part in PARTS:
            url = f"/console/parts/{part}"
            nobody = await http.get(url)
            assert nobody.status_code == 401, part
            assert nobody.headers["content-type"].startswith("application/problem+json")
            refused = await http.get(url, headers={"x-api-key": plain})
            assert refused.status_code == 403, part
            assert refused.json()["errors"] == [{"field": "key", "reason": "needs the admin scope"}]
            shown = await http.get(url, headers={"x-api-key": admin})
            assert shown.status_code == 200, (part, shown.text)
            assert shown.headers["content-type"].startswith("text/html")
            # a key anywhere but in a header is no key: it would end up in logs and history
            for name in ("key", "apiKey", "api_key", "x-api-key", "X-API-Key"):
                in_query = await http.get(url, params={name: admin})
                assert in_query.status_code == 401, (part, name)
            in_cookie = await http.get(url, headers={"cookie": f"x-api-key={admin}"})
            assert in_cookie.status_code == 401
        # the shell and its assets hold no data: they load without a key
        for path in ("/console", "/console/assets/console.js", "/console/assets/console.css"):
            assert (await http.get(path)).status_code == 200, path


async def test_console_responses_keep_the_page_to_itself(database: str, prefix: str) -> None:
    async with served_with_clients(make_settings(database, prefix)) as served:
        http = served.http
        page = await http.get("/console")
        parts = [await http.get(f"/console/parts/{part}") for part in PARTS]
        assets = [await http.get(f"/console/assets/console.{ext}") for ext in ("js", "css")]
        for response in [page, *parts, *assets]:
            assert response.status_code == 200, response.url
            assert response.headers["content-security-policy"] == CSP
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["referrer-policy"] == "no-referrer"
            assert response.headers["x-content-type-options"] == "nosniff"
        for response in [page, *parts]:
            assert response.headers["cache-control"] == "no-store", response.url
        assert "script-src 'self';" in CSP and "unsafe-inline" not in CSP
        # one local script and one local stylesheet; no inline script, nothing from elsewhere
        html = page.text
        assert re.findall(r"<script[^>]*>", html) == [
            '<script src="/console/assets/console.js" defer>'
        ]
        assert re.findall(r'(?:href|src)="([^"]+)"', html) == [
            "/console/assets/favicon.svg",
            "/console/assets/console.css",
            "/console/assets/console.js",
        ]
        assert not re.search(r"<[^>]+\son[a-z]+=", html)
        assert "javascript" in assets[0].headers["content-type"]
        # the console is no API: it stays out of the OpenAPI document
        document = (await http.get("/api/openapi.json")).json()
        assert not [path for path in document["paths"] if path.startswith("/console")]


async def test_fragments_show_counts_failures_and_pages(database: str, prefix: str) -> None:
    schedules = {"nightly": {"cron": "0 3 * * *", "operation": order(0)}}
    settings = make_settings(
        database,
        prefix,
        STREAMSVC_SCHEDULES=json.dumps(schedules),
        BATCH_PROCESS_OPERATION_LIMIT="10",
    )
    async with served_with_clients(settings) as served:
        http = served.http
        bad = (
            await http.post(
                "/api/operations", json=order(1, values={"id": 1, "customer": "c", "amount": -1})
            )
        ).json()
        batch = await http.post("/api/operations/batch", json=[order(i) for i in range(2, 32)])
        good = [item["id"] for item in batch.json()]
        await ended(served, bad["id"], "FAIL")
        for op_id in good:
            await ended(served, op_id, "SUCCESS")

        overview = (await http.get("/console/parts/overview", params={"window": "5m"})).text
        assert "last 5 minutes" in overview
        assert re.search(
            r'<span class="count">30</span><span class="label">SUCCESS</span>', overview
        )
        assert re.search(r'<span class="count">1</span><span class="label">FAIL</span>', overview)
        assert 'data-action="pause" data-type="ORDER_CREATED"' in overview
        assert overview.count('<rect class="bar"') == 30  # a bar per minute
        assert "31 in all" in overview

        failures = (await http.get("/console/parts/failures")).text
        assert bad["id"] in failures and "orders_amount_check" in failures
        assert f'data-action="retry" data-id="{bad["id"]}"' in failures

        listed = (await http.get("/console/parts/operations")).text
        assert listed.count('<tr class="op"') == 25
        cursor = re.search(r'data-action="page" data-cursor="([^"]+)"', listed)
        assert cursor is not None
        rest = (await http.get("/console/parts/operations", params={"cursor": cursor[1]})).text
        assert rest.count('<tr class="op"') == 6 and 'data-action="first"' in rest
        assert 'data-action="page"' not in rest

        failed = (await http.get("/console/parts/operations", params={"status": "FAIL"})).text
        assert failed.count('<tr class="op"') == 1 and 'data-action="retry"' in failed
        succeeded = (
            await http.get(
                "/console/parts/operations",
                params={"status": "SUCCESS", "operationType": "ORDER_CREATED"},
            )
        ).text
        assert succeeded.count('<tr class="op"') == 25 and "data-action=" in succeeded
        assert 'data-action="retry"' not in succeeded and 'data-action="cancel"' not in succeeded

        found = (await http.get("/console/parts/operations", params={"id": bad["id"]})).text
        assert found.count('<tr class="op"') == 1 and '<tr class="detail">' in found
        assert "&#34;amount&#34;: -1" in found  # the operation's body, as sent
        unknown = (await http.get("/console/parts/operations", params={"id": "nope"})).text
        assert "No operation with id <code>nope</code>" in unknown
        foreign = (await http.get("/console/parts/operations", params={"cursor": "bm9wZQ=="})).text
        assert '<p class="problem">cursor: not a cursor this service gave</p>' in foreign
        wrong = await http.get("/console/parts/operations", params={"status": "DONE"})
        assert wrong.status_code in (400, 422)

        retried = await http.post(f"/api/operations/{bad['id']}/retry")
        assert retried.status_code == 200
        await ended(served, bad["id"], "FAIL")  # the cause is still there: it fails again

        assert (await http.post("/api/types/ORDER_CREATED/pause")).status_code == 200
        paused = (await http.get("/console/parts/paused")).text
        assert 'data-action="resume" data-type="ORDER_CREATED"' in paused
        overview = (await http.get("/console/parts/overview")).text
        assert 'data-action="resume" data-type="ORDER_CREATED"' in overview

        recurring = (await http.get("/console/parts/schedules")).text
        assert "nightly" in recurring and "0 3 * * *" in recurring and "never" in recurring
        assert re.search(r"\d{4}-\d\d-\d\d 03:00:00 \(in ", recurring)


async def test_hostile_values_render_as_text(database: str, prefix: str) -> None:
    async with served_with_clients(make_settings(database, prefix)) as served:
        http = served.http
        ids = []
        for i, hostile in enumerate(HOSTILE):
            op = order(100 + i, operationType=hostile, meta={"note": hostile}, orderingKey=hostile)
            created = await http.post("/api/operations", json=op)
            assert created.status_code == 201, created.text
            ids.append(created.json()["id"])
        for op_id in ids:
            await ended(served, op_id, "SUCCESS")
        # an error text is PostgreSQL's, but it quotes what callers sent: make one hostile
        await served.db.execute(
            """UPDATE "BatchOperations" SET status = 'FAIL', error = $2 WHERE id = $1::uuid""",
            ids[0],
            HOSTILE[1] + HOSTILE[0],
        )
        # the pause route cannot take a type with a "/" (the path's separator, even encoded)
        for hostile in [h for h in HOSTILE if "/" not in h]:
            paused = await http.post(f"/api/types/{quote(hostile, safe='')}/pause")
            assert paused.status_code == 200, paused.text
        pages = [(await http.get(f"/console/parts/{part}")).text for part in PARTS] + [
            (await http.get("/console/parts/operations", params={"id": op_id})).text
            for op_id in ids
        ]
        shown = "".join(pages)
        assert "<script" not in shown and "<img" not in shown
        assert "&lt;script&gt;alert(&#34;t&#34;)&lt;/script&gt;" in shown
        assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in shown
        assert 'data-type="&#34;&gt;&lt;img src=x onerror=alert(1)&gt;"' in shown
