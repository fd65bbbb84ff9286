"""The operations console in a real headless browser against a real `streamsvc run`: it
loads with nothing from outside the machine, asks for the admin key, shows a FAIL that was
just produced with its error, retries it, and the operation ends SUCCESS.

With STREAMSVC_CONSOLE_SHOTS=<dir> it also keeps its screenshots of the page at a desk's
and a phone's size there (`just console-screenshots` renews docs/console/)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest

from benchmarks.harness import PG, ServiceProcess
from streamsvc.allowlist import AllowList
from streamsvc.keys import KeyStore
from tests.browser import Page, chromium, open_page
from tests.conftest import ALLOWED, SECRET, settings_env
from tests.pipeline import eventually, order

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SIZES = {"desktop": (1280, 800), "phone": (390, 844)}
HOSTILE = '"><img src=x onerror=alert(1)>'
SCHEDULES = {
    "counter-tick": {
        "cron": "*/5 * * * *",
        "operation": {
            "operationType": "COUNTER_TICK",
            "table": "counters",
            "action": "update",
            "values": {"value": 0},
            "key": {"name": "ticks"},
        },
    },
    "nightly-cleanup": {
        "cron": "30 2 * * *",
        "operation": {
            "operationType": "ORDERS_PURGED",
            "table": "orders",
            "action": "delete",
            "key": {"id": 0},
        },
    },
}


def png_size(path: Path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


async def part_text(page: Page, part: str) -> str:
    return str(await page.evaluate(f"document.querySelector('[data-part={part}]').innerText"))


async def test_console_shows_a_failure_and_retries_it(
    database: str, prefix: str, tmp_path: Path
) -> None:
    if chromium() is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    env = settings_env(
        database,
        prefix,
        STREAMSVC_AUTH="on",
        API_KEY_ENCRYPTION_SECRET=SECRET,
        STREAMSVC_SCHEDULES=json.dumps(SCHEDULES),
    )
    db = await asyncpg.connect(database=database, **PG)
    keys = KeyStore(SECRET, AllowList.parse(ALLOWED))
    actions = ["insert", "update", "upsert", "delete"]
    key = await keys.create(db, "ops", tables=None, actions=actions, allow_sql=False, admin=True)
    base = f"http://127.0.0.1:{env['STREAMSVC_HTTP_PORT']}"
    service = ServiceProcess(env, tmp_path)
    try:
        await service.start()
        async with httpx.AsyncClient(base_url=base, headers={"x-api-key": key}) as api:
            good = [order(i) for i in range(1, 41)]
            good += [{**order(i), "operationType": "ORDER_IMPORTED"} for i in range(41, 53)]
            good.append({**order(53), "operationType": HOSTILE})
            assert (await api.post("/api/operations/batch", json=good)).status_code == 200
            poison = order(99, values={"id": 99, "customer": "c", "amount": -1})
            bad = (await api.post("/api/operations", json=poison)).json()["id"]
            held = {**order(200), "operationType": "ORDER_ARCHIVED"}
            assert (await api.post("/api/types/ORDER_ARCHIVED/pause")).status_code == 200
            assert (await api.post("/api/operations", json=held)).status_code == 201

        async def failed() -> bool:
            status = await db.fetchval(
                'SELECT status FROM "BatchOperations" WHERE id = $1::uuid', bad
            )
            return bool(status == "FAIL")

        await eventually(failed, within=30)

        async with open_page(tmp_path / "profile") as page:
            await page.goto(f"{base}/console")
            # no key yet: the fragments answer 401 and the page asks for one
            await page.wait_for("!document.querySelector('#login').hidden")
            reason = await page.evaluate("document.querySelector('#login-reason').innerText")
            assert "key" in reason
            await page.type("#key", key)
            await page.click("#key-form button[type=submit]")
            row = f"[data-part=failures] tr[data-id='{bad}']"
            await page.wait_for(f'!!document.querySelector("{row}")')
            failure = await page.evaluate(f'document.querySelector("{row}").innerText')
            assert "FAIL" in failure and "orders_amount_check" in failure
            await page.wait_for(
                "document.querySelector('[data-part=schedules]').innerText.includes('counter-tick')"
            )
            await page.wait_for(
                "document.querySelector('[data-part=paused]').innerText.includes('ORDER_ARCHIVED')"
            )
            await page.wait_for("document.querySelector('#live').innerText.startsWith('updated')")
            overview = await part_text(page, "overview")
            assert "ORDER_IMPORTED" in overview and HOSTILE in overview  # as text

            shots = Path(os.environ.get("STREAMSVC_CONSOLE_SHOTS") or tmp_path)
            await anyio.Path(shots).mkdir(parents=True, exist_ok=True)
            for name, (width, height) in SIZES.items():
                path = shots / f"console-{name}.png"
                await page.screenshot(path, width=width, height=height)
                assert png_size(path) == (width, height)

            # mend the cause, then retry from the console
            await db.execute("ALTER TABLE orders DROP CONSTRAINT orders_amount_check")
            await page.click(f"{row} button[data-action=retry]")
            await page.wait_for(
                f"document.querySelector('#flash').innerText.startsWith('retry: {bad}')"
            )

            async def succeeded() -> bool:
                status = await db.fetchval(
                    'SELECT status FROM "BatchOperations" WHERE id = $1::uuid', bad
                )
                return bool(status == "SUCCESS")

            await eventually(succeeded, within=30)
            assert await db.fetchval("SELECT amount FROM orders WHERE id = 99") == -1

            # search it by id: it shows SUCCESS, with no button left to press
            await page.type("#filters input[name=id]", bad)
            await page.click("#filters button[type=submit]")
            found = f"[data-part=operations] tr[data-id='{bad}']"
            await page.wait_for(
                f"document.querySelector(\"{found}\")?.innerText.includes('SUCCESS')"
            )
            assert await page.evaluate(f'document.querySelectorAll("{found} button").length') == 0
            assert not await page.evaluate(f'!!document.querySelector("{row}")')

            # the key stayed in the tab and in headers: no cookie, no URL carries it
            assert await page.evaluate("document.cookie") == ""
            assert not [url for url in page.requests if key in url]
            # nothing from elsewhere, and the hostile operationType ran nothing
            assert not [url for url in page.requests if not url.startswith(f"{base}/")]
            assert await page.evaluate("document.querySelectorAll('img').length") == 0
            assert page.dialogs == []
            assert page.errors == []
            assert all("status of 401" in note for note in page.refused), page.refused
    finally:
        service.stop()
        await db.close()
