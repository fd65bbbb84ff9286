"""Pure: the id an operation is stored under, per caller."""

import uuid

import pytest

from streamsvc.actors.ingress import stored_id
from streamsvc.validate import ANONYMOUS, Caller

GIVEN = uuid.UUID("9b2b7c1e-0f7d-4c1a-9f43-6a8b1f6a3c10")
DEFAULT = "6f1c2a4e-8d3b-5c7a-9e0f-1a2b3c4d5e6f"


@pytest.mark.parametrize(
    ("given", "default", "expected"),
    [(GIVEN, None, str(GIVEN)), (GIVEN, DEFAULT, str(GIVEN)), (None, DEFAULT, DEFAULT)],
)
def test_the_anonymous_caller_keeps_the_id_it_gave(
    given: uuid.UUID | None, default: str | None, expected: str
) -> None:
    assert stored_id(ANONYMOUS, given, default) == expected


def test_a_keys_ids_are_its_own_and_stable() -> None:
    a, b = Caller("a"), Caller("b")
    from_a = stored_id(a, GIVEN, None)
    assert from_a == stored_id(a, GIVEN, DEFAULT) == stored_id(Caller("a", admin=True), GIVEN, None)
    assert uuid.UUID(from_a).version == 5
    assert from_a not in {str(GIVEN), stored_id(b, GIVEN, None)}
    assert stored_id(a, None, DEFAULT) not in {DEFAULT, stored_id(b, None, DEFAULT), from_a}
    # A name cannot be made to collide with another by moving the separator.
    assert stored_id(Caller("a\nb"), None, "c") != stored_id(Caller("a"), None, "b\nc")


def test_without_any_id_each_operation_gets_a_fresh_one() -> None:
    for caller in (ANONYMOUS, Caller("a")):
        first, second = stored_id(caller, None, None), stored_id(caller, None, None)
        assert first != second and uuid.UUID(first).version == 4
