import msgspec

from streamsvc.actors.notifier import publications
from streamsvc.model import Outcome, Status
from streamsvc.settings import Route

OUTCOMES = [
    Outcome("a", "ORDER", Status.SUCCESS, None, 1, "b1", {"req": 1}, "u-a"),
    Outcome("b", "ORDER", Status.FAIL, "duplicate key", 1, "b1"),
    Outcome("c", "PAY", Status.SUCCESS, None, 2, "b1"),
]
ROUTES = {"ORDER": Route(queue="orders", pattern="order_done")}


def decoded(pubs: list[tuple[str | None, str, bytes]]) -> list[tuple[str | None, str, object]]:
    return [(exchange, key, msgspec.json.decode(body)) for exchange, key, body in pubs]


def test_aggregate_mode_groups_a_flush_per_type_status_and_route_with_both_ids() -> None:
    assert decoded(publications(OUTCOMES, ROUTES, "aggregate", "events")) == [
        (
            "events",
            "ORDER.SUCCESS",
            {
                "pattern": "batch_operations_finished",
                "data": {
                    "operationType": "ORDER",
                    "success": [{"id": "a", "meta": {"req": 1}, "userOperationId": "u-a"}],
                    "failed": [],
                },
            },
        ),
        (
            "events",
            "ORDER.FAIL",
            {
                "pattern": "batch_operations_finished",
                "data": {
                    "operationType": "ORDER",
                    "success": [],
                    "failed": [
                        {"id": "b", "error": "duplicate key", "meta": None, "userOperationId": None}
                    ],
                },
            },
        ),
        (
            None,
            "orders",
            {
                "pattern": "order_done",
                "data": {
                    "operationType": "ORDER",
                    "success": [{"id": "a", "meta": {"req": 1}, "userOperationId": "u-a"}],
                    "failed": [
                        {"id": "b", "error": "duplicate key", "meta": None, "userOperationId": None}
                    ],
                },
            },
        ),
        (
            "events",
            "PAY.SUCCESS",
            {
                "pattern": "batch_operations_finished",
                "data": {
                    "operationType": "PAY",
                    "success": [{"id": "c", "meta": None, "userOperationId": None}],
                    "failed": [],
                },
            },
        ),
    ]


def test_operation_mode_sends_one_event_per_operation() -> None:
    pubs = decoded(publications(OUTCOMES, ROUTES, "operation", "events"))
    assert [(e, k) for e, k, _ in pubs] == [
        ("events", "ORDER.SUCCESS"),
        (None, "orders"),
        ("events", "ORDER.FAIL"),
        (None, "orders"),
        ("events", "PAY.SUCCESS"),
    ]
    assert pubs[0][2] == {
        "pattern": "batch_operation_finished",
        "data": {
            "id": "a",
            "operationType": "ORDER",
            "status": "SUCCESS",
            "error": None,
            "attempts": 1,
            "batchId": "b1",
            "meta": {"req": 1},
            "userOperationId": "u-a",
        },
    }
    assert pubs[1][2]["pattern"] == "order_done"  # type: ignore[index]
