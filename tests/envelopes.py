"""Hypothesis strategies for operation envelopes: random, and valid but for one field's
content (what reaches the stores when a door lets it through)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from hypothesis import strategies as st

# Strings hostile to PostgreSQL, Redis and AMQP, mixed with ordinary ones.
hostile_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "\x00", "a\x00b", "é" * 130, "\n", "\x7f", "\u2028", "id", "note"]),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=300),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    hostile_text,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=4),
    max_leaves=20,
)


@st.composite
def deep_json(draw: st.DrawFn) -> Any:
    value: Any = draw(scalars)
    for _ in range(draw(st.integers(min_value=0, max_value=80))):
        value = [value] if draw(st.booleans()) else {"k": value}
    return value


times = st.one_of(
    st.datetimes(
        min_value=dt.datetime(1, 1, 2),
        max_value=dt.datetime(9999, 12, 30),
        timezones=st.sampled_from([None, dt.UTC, dt.timezone(dt.timedelta(hours=-14))]),
    ).map(dt.datetime.isoformat),
    hostile_text,
)
columns = st.dictionaries(
    st.sampled_from(["id", "customer", "amount", "note", "total", "nope"]) | hostile_text,
    json_values,
    max_size=4,
)
# Valid but for what a field holds: most of these reach the stores when the door lets them.
near_valid = st.fixed_dictionaries(
    {
        "operationType": hostile_text | st.just("ORDER_CREATED"),
        "table": st.just("orders"),
        "action": st.just("insert"),
        "values": st.fixed_dictionaries(
            {"id": st.integers(min_value=1, max_value=2**31 - 1), "customer": hostile_text},
            optional={"note": hostile_text | json_values},
        ),
    },
    optional={
        "userOperationId": st.uuids().map(str),
        "priority": st.integers(min_value=0, max_value=9),
        "runAt": times,
        "delayMs": st.integers(min_value=0, max_value=2**40),
        "orderingKey": hostile_text,
        "meta": json_values | deep_json(),
    },
) | st.fixed_dictionaries(
    {
        "operationType": hostile_text,
        "sql": st.just("UPDATE orders SET note = $1 WHERE id = $2"),
        "params": st.tuples(hostile_text, st.integers(min_value=1, max_value=9)).map(list),
    }
)
random_envelopes = st.fixed_dictionaries(
    {"operationType": hostile_text},
    optional={
        "userOperationId": st.uuids().map(str) | hostile_text,
        "table": st.sampled_from(["orders", "public.orders", "limited", "nope"]) | hostile_text,
        "action": st.sampled_from(["insert", "upsert", "update", "delete"]) | hostile_text,
        "values": columns,
        "key": columns,
        "sql": st.sampled_from(
            [
                "UPDATE orders SET note = $1 WHERE id = $2",
                "INSERT INTO orders (id, customer, amount) VALUES ($1, $2, $3)",
                "DELETE FROM orders WHERE note = 'a\x00'",
                "DROP TABLE orders",
            ]
        ),
        "params": st.lists(json_values, max_size=4),
        "priority": st.integers(min_value=-3, max_value=12),
        "runAt": times,
        "delayMs": st.integers(min_value=-1, max_value=2**70),
        "orderingKey": hostile_text,
        "meta": json_values | deep_json(),
        "apiKey": hostile_text,
        "extra": json_values,
    },
)
envelopes = near_valid | random_envelopes
