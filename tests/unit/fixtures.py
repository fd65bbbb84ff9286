"""A catalog built by hand, shaped like the integration tests' target tables."""

from __future__ import annotations

from streamsvc.allowlist import AllowList, TableRef
from streamsvc.catalog import Catalog, Column, Table


def _table(name: str, columns: dict[str, str], pk: tuple[str, ...], *unique: str) -> Table:
    ref = TableRef("public", name)
    cols = {c: Column(c, t, writable=c != "total") for c, t in columns.items()}
    keys = (frozenset(pk), *(frozenset([u]) for u in unique))
    return Table(ref, cols, pk, keys)


def catalog(allow: str = "orders, payments, counters, limited(id, note)") -> Catalog:
    tables = [
        _table(
            "orders",
            {
                "id": "integer",
                "customer": "text",
                "amount": "numeric(12,2)",
                "note": "text",
                "total": "numeric",
            },
            ("id",),
        ),
        _table("payments", {"id": "bigint", "order_id": "integer", "amount": "numeric"}, ("id",)),
        _table("counters", {"name": "text", "value": "integer", "code": "text"}, ("name",), "code"),
        _table("limited", {"id": "integer", "note": "text", "secret": "text"}, ("id",)),
    ]
    allowed = AllowList.parse(allow)
    return Catalog(allowed, {t.ref: t for t in tables if t.ref in allowed.tables})
