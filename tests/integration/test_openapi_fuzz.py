"""Schemathesis against the live HTTP API's own OpenAPI document.

Every operation of the document is called with generated requests, valid ones and ones
the schema forbids, by a caller holding a real key. None may get a server error or an
answer other than the document's, and afterwards the service still stores and applies
another caller's good operation.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import anyio
import asyncpg
import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, not_a_server_error
from schemathesis.core.result import Ok

from tests.conftest import PG, keyed_settings
from tests.pipeline import eventually, order, serving

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

EXAMPLES = 60  # per operation and mode: a few seconds each on the real servers


def fuzz(spec: dict[str, Any], base_url: str, headers: dict[str, str]) -> Counter[str]:
    """Call every operation with generated requests; count the answers by operation and
    status class (``POST /api/operations 2xx``)."""
    schema = schemathesis.openapi.from_dict(spec)
    answers: Counter[str] = Counter()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis_settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
                phases=[hypothesis.Phase.generate],
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(
                case: schemathesis.Case[schemathesis.APIOperation[Any, Any, Any, Any]],
            ) -> None:
                response = case.call(base_url=base_url, headers=headers, timeout=30)
                answers[f"{case.operation.label} {response.status_code // 100}xx"] += 1
                case.validate_response(
                    response, checks=[not_a_server_error, content_type_conformance]
                )

            try:
                call()
            except hypothesis.errors.Unsatisfiable:
                # Nothing to negate: a path parameter that is any string.
                assert mode is GenerationMode.NEGATIVE, operation.label
    return answers


async def test_generated_requests_get_no_server_error_and_harm_no_one(
    database: str, prefix: str
) -> None:
    settings = keyed_settings(database, prefix)
    base_url = f"http://127.0.0.1:{settings.http_port}"
    conn = await asyncpg.connect(database=database, **PG)
    try:
        async with serving(settings) as service:
            assert service.keys is not None
            fuzzer = await service.keys.create(
                conn, "fuzzer", tables=None, actions=["insert", "update"], allow_sql=True
            )
            other = await service.keys.create(
                conn, "other", tables=["orders"], actions=["insert"], allow_sql=False
            )
            await service.keys.load(conn)
            async with httpx.AsyncClient(base_url=base_url) as client:
                spec = (await client.get("/api/openapi.json")).json()
                answers = await anyio.to_thread.run_sync(
                    fuzz, spec, base_url, {"x-api-key": fuzzer}
                )
                # Generated operations name tables that do not exist: refused, not stored.
                for seen in (
                    "POST /api/operations 4xx",
                    "POST /api/operations/batch 2xx",
                    "POST /api/operations/batch 4xx",
                    "GET /api/operations/{operation_id} 4xx",
                ):
                    assert answers[seen], (seen, answers)

                op_id = str(uuid.uuid4())
                created = await client.post(
                    "/api/operations",
                    json=order(424_242, userOperationId=op_id),
                    headers={"x-api-key": other},
                )
                assert created.status_code == 201, created.text

                async def applied() -> bool:
                    status = await conn.fetchval(
                        'SELECT status FROM "BatchOperations" WHERE id = $1',
                        uuid.UUID(created.json()["id"]),
                    )
                    return bool(status == "SUCCESS")

                await eventually(applied, within=20)
                assert (await client.get("/readyz")).status_code == 200
    finally:
        await conn.close()
