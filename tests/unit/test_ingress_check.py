"""Ingress.check: SQL not seen before is checked off the event loop's thread."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from streamsvc import sqlguard
from streamsvc.actors.ingress import Ingress
from streamsvc.model import Operation
from streamsvc.validate import ANONYMOUS
from tests.unit.fixtures import catalog

pytestmark = pytest.mark.anyio


def statement(n: int) -> Operation:
    return Operation(
        operation_type="SQL",
        sql=f"INSERT INTO orders (id, customer, amount) VALUES ($1, 'c{n}', 1)",
        params=[n],
    )


def ingress() -> Ingress:
    return Ingress(None, None, None, catalog(), chunk=100)  # type: ignore[arg-type]  # no I/O here


async def test_a_new_statement_is_checked_while_the_event_loop_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The analysis waits for a coroutine on the event loop: were it run on the loop's own
    thread, that coroutine could never run and the check would fail."""
    loop_ran = threading.Event()
    analyse = sqlguard._analyse

    def slow_analyse(*args: Any) -> Any:
        assert loop_ran.wait(timeout=10), "the event loop was blocked by the check"
        return analyse(*args)

    monkeypatch.setattr(sqlguard, "_analyse", slow_analyse)
    gate, op = ingress(), statement(uuid.uuid4().int % 1000)
    async with anyio.create_task_group() as tg:
        tg.start_soon(gate.check, op, ANONYMOUS)
        await anyio.lowlevel.checkpoint()  # the check starts first
        loop_ran.set()
    assert sqlguard.remembered(op.sql or "", gate.catalog.allow, ANONYMOUS.tables)


async def test_a_statement_seen_before_is_checked_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = ingress()
    op = statement(uuid.uuid4().int % 1000)
    await gate.check(op, ANONYMOUS)

    def no_thread(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a remembered statement needs no worker thread")

    monkeypatch.setattr(anyio.to_thread, "run_sync", no_thread)
    await gate.check(op, ANONYMOUS)
