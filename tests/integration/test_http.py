"""The HTTP API on the real servers, through Litestar's ASGI test client."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest

from streamsvc.settings import Settings
from streamsvc.supervisor import Service
from tests.conftest import PG, keyed_settings, make_settings
from tests.pipeline import eventually, order, serving

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@asynccontextmanager
async def http_client(settings: Settings) -> AsyncIterator[tuple[Service, httpx.AsyncClient]]:
    """The service, its HTTP server listening on a port of its own, and a client for it."""
    base = f"http://127.0.0.1:{settings.http_port}"
    async with serving(settings) as service, httpx.AsyncClient(base_url=base) as c:
        yield service, c


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(settings) as (_, c):
        yield c


async def test_create_get_and_repeat(client: httpx.AsyncClient) -> None:
    op_id = str(uuid.uuid4())
    created = await client.post("/api/operations", json=order(1, userOperationId=op_id))
    assert created.status_code == 201
    assert created.json() == {
        "id": op_id,
        "operationType": "ORDER_CREATED",
        "status": "UNPROCESSED",
        "created": True,
    }
    again = await client.post("/api/operations", json=order(1, userOperationId=op_id))
    assert (again.status_code, again.json()["created"]) == (200, False)

    async def applied() -> bool:
        got = await client.get(f"/api/operations/{op_id}")
        return bool(got.json()["status"] == "SUCCESS")

    await eventually(applied, within=10)
    view = (await client.get(f"/api/operations/{op_id}")).json()
    assert (view["source"], view["attempts"], view["operation"]["table"]) == ("http", 1, "orders")


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        (order(2, priority=12), "priority", "expected `int` <= 9"),
        (order(3, vaules={}), "vaules", "object contains unknown field `vaules`"),
        ({"table": "orders"}, "operationType", "object missing required field `operationType`"),
        ({**order(4), "values": {"nope": 1}}, "values.nope", "no such column in public.orders"),
        (
            {"operationType": "X", "sql": "DROP TABLE orders"},
            "sql",
            "only INSERT, UPDATE or DELETE",
        ),
    ],
)
async def test_refusals_are_problem_documents_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], field: str, reason: str
) -> None:
    response = await client.post("/api/operations", json=body)
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert (problem["status"], problem["title"]) == (422, "Operation refused")
    assert problem["errors"][0]["field"] == field
    assert reason in problem["errors"][0]["reason"]
    assert problem["detail"].startswith(f"{field}: ")


async def test_malformed_json_and_unknown_ids(client: httpx.AsyncClient) -> None:
    for path, body in (("/api/operations", b"{oops"), ("/api/operations/batch", b" ")):
        malformed = await client.post(
            path, content=body, headers={"content-type": "application/json"}
        )
        assert malformed.status_code == 422, (path, body)
        assert malformed.json()["errors"][0]["field"] == "body"
    missing = await client.get(f"/api/operations/{uuid.uuid4()}")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")


async def test_batch_answers_each_item(client: httpx.AsyncClient, settings: Settings) -> None:
    response = await client.post(
        "/api/operations/batch", json=[order(10), {**order(11), "values": {"nope": 1}}, order(12)]
    )
    assert response.status_code == 200
    items = response.json()
    assert [i.get("created") for i in items] == [True, None, True]
    assert items[1] == {
        "index": 1,
        "error": {"field": "values.nope", "reason": "no such column in public.orders"},
    }
    conn = await asyncpg.connect(database=settings.db_name, **PG)
    try:
        assert await conn.fetchval('SELECT count(*) FROM "BatchOperations"') == 2
    finally:
        await conn.close()


async def test_openapi_docs_and_probes(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/api/openapi.json")).json()
    assert {"/api/operations", "/api/operations/batch", "/api/operations/{operation_id}"} <= set(
        spec["paths"]
    )
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "Authorization: Bearer <key>",
    }
    assert schemes["apiKey"]["in"] == "header" and schemes["apiKey"]["name"] == "X-API-Key"
    assert spec["security"] == [{"bearer": []}, {"apiKey": []}]
    tags = {
        (method.upper(), path): tuple(op["tags"])
        for path, item in spec["paths"].items()
        for method, op in item.items()
    }
    assert set(tags.values()) <= {("operations",), ("queue",), ("health",)}, tags
    assert tags[("POST", "/api/operations/{operation_id}/retry")] == ("operations",)
    for route in ("/api/types/{operation_type}/pause", "/api/types/{operation_type}/resume"):
        assert tags[("POST", route)] == ("queue",)
    assert tags[("GET", "/api/types/paused")] == ("queue",)
    schemas = spec["components"]["schemas"]
    operation = next(v for k, v in schemas.items() if k.endswith("Operation"))
    assert {"operationType", "userOperationId", "table", "sql"} <= set(operation["properties"])
    docs = await client.get("/api/docs")
    assert docs.status_code == 200
    assert "/api/docs/assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower() and "unpkg" not in docs.text.lower()
    bundle = await client.get("/api/docs/assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}


async def test_metrics_move_by_what_happened(client: httpx.AsyncClient) -> None:
    def value(text: str, sample: str) -> float:
        for line in text.splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        return 0.0

    samples = {
        "received": 'streamsvc_operations_received_total{source="http"}',
        "rejected": 'streamsvc_operations_rejected_total{source="http"}',
        "succeeded": "streamsvc_operations_succeeded_total",
        "failed": "streamsvc_operations_failed_total",
        "flush_ops": "streamsvc_flush_size_operations_sum",
        "flushes": "streamsvc_flush_size_operations_count",
        "latency": "streamsvc_end_to_end_latency_seconds_count",
        "intake_ops": "streamsvc_intake_size_operations_sum",
        "relayed": "streamsvc_relay_size_outcomes_sum",
    }
    text = (await client.get("/metrics")).text
    before = {k: value(text, v) for k, v in samples.items()}
    duplicate = order(20)
    response = await client.post(
        "/api/operations/batch",
        json=[order(20), order(21), duplicate, {**order(22), "values": {"nope": 1}}],
    )
    assert response.status_code == 200

    async def flushed() -> bool:
        text = (await client.get("/metrics")).text
        ended = value(text, samples["succeeded"]) + value(text, samples["failed"])
        relayed = value(text, samples["relayed"])
        return ended >= before["succeeded"] + before["failed"] + 3 and (
            relayed >= before["relayed"] + 3
        )

    await eventually(flushed, within=10)
    text = (await client.get("/metrics")).text
    moved = {k: value(text, v) - before[k] for k, v in samples.items()}
    assert (moved["received"], moved["rejected"]) == (3, 1)
    assert (moved["succeeded"], moved["failed"]) == (2, 1)  # the duplicate key fails
    assert moved["flush_ops"] == 3 and moved["flushes"] >= 1
    assert moved["latency"] == 3
    assert moved["intake_ops"] == 3, "the three valid ones went to one intake"
    assert moved["relayed"] == 3, "each outcome relayed once"


async def test_body_size_limit(database: str, prefix: str) -> None:
    settings = make_settings(database, prefix, STREAMSVC_MAX_BODY_BYTES="1000")
    async with http_client(settings) as (_, c):
        response = await c.post("/api/operations", json={**order(1), "meta": "x" * 5000})
    assert response.status_code == 413
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_api_keys_over_http(database: str, prefix: str) -> None:
    settings = keyed_settings(database, prefix)
    conn = await asyncpg.connect(database=database, **PG)
    try:
        async with http_client(settings) as (service, c):
            assert service.keys is not None
            key = await service.keys.create(
                conn, "web", tables=None, actions=["insert"], allow_sql=False
            )
            await service.keys.load(conn)
            nobody = await c.post("/api/operations", json=order(1))
            assert (nobody.status_code, nobody.json()["errors"][0]["field"]) == (401, "key")
            bearer = await c.post(
                "/api/operations", json=order(2), headers={"authorization": f"Bearer {key}"}
            )
            header = await c.post("/api/operations", json=order(3), headers={"x-api-key": key})
            assert (bearer.status_code, header.status_code) == (201, 201)
            wrong = await c.get(
                f"/api/operations/{bearer.json()['id']}", headers={"x-api-key": "ssk_nope"}
            )
            assert wrong.status_code == 401
    finally:
        await conn.close()
