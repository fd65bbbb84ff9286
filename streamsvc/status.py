"""`streamsvc status`: where the work stands, read from Redis and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.console import Group
from rich.table import Table

from streamsvc.adapters import streams as rs
from streamsvc.schedules import Schedule, next_tick
from streamsvc.store import PausedType, Store

WINDOW_S = 60


@dataclass
class Snapshot:
    streams: dict[str, int] = field(default_factory=dict)  # name -> entries
    consumers: list[tuple[str, str, int, int]] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    finished_per_s: float = 0.0
    failures: list[tuple[str, str, str | None, dt.datetime | None]] = field(default_factory=list)
    # name, cron, last submitted tick, next tick
    schedules: list[tuple[str, str, dt.datetime | None, dt.datetime]] = field(default_factory=list)
    paused: list[PausedType] = field(default_factory=list)


async def gather(
    store: Store,
    streams: rs.Streams,
    *,
    failures: int = 10,
    schedules: Sequence[Schedule] = (),
) -> Snapshot:
    snap = Snapshot()
    names = streams.names
    several = names.shard_count > 1
    of = {n.shard: f" of shard {n.shard}" if several else "" for n in names.shards}
    outcomes = [(f"outcomes{of[n.shard]}", n.outcomes, rs.NOTIFIER_GROUP) for n in names.shards]
    work = [
        (f"work (priority {p}){of[n.shard]}", stream, rs.FLUSHER_GROUP)
        for n in names.shards
        for p, stream in zip(rs.PRIORITIES, n.work_streams, strict=True)
    ]
    watched = [("inbox", names.inbox, rs.INGRESS_GROUP), *outcomes]
    shown = [*watched, ("rejects", names.rejects, ""), ("dead", names.dead, ""), *work]
    for label, stream, _ in shown:
        snap.streams[label] = await streams.length(stream)
    watched += work
    for label, stream, group in watched:
        for c in await streams.consumers(stream, group):
            snap.consumers.append((label, c.name, c.pending, c.idle_ms))
    summary = await store.summary(failures=failures, window_s=WINDOW_S)
    snap.statuses = summary.statuses
    snap.finished_per_s = summary.finished_per_s
    snap.failures = [(f.id, f.operation_type, f.error, f.processed_at) for f in summary.failures]
    snap.paused = await store.paused_types()
    if schedules:
        last = await store.last_ticks()
        now = dt.datetime.now(dt.UTC)
        snap.schedules = [(s.name, s.cron, last.get(s.name), next_tick(s, now)) for s in schedules]
    return snap


def render(snap: Snapshot) -> Group:
    depths = Table(title="Streams", title_justify="left")
    depths.add_column("stream")
    depths.add_column("entries", justify="right")
    for name, length in snap.streams.items():
        depths.add_row(name, str(length))

    consumers = Table(title="Consumers (pending = taken, not yet acked)", title_justify="left")
    for column in ("stream", "consumer", "pending", "idle s"):
        consumers.add_column(
            column, justify="left" if column in ("stream", "consumer") else "right"
        )
    for stream, name, pending, idle_ms in snap.consumers:
        consumers.add_row(stream, name, str(pending), f"{idle_ms / 1000:.1f}")

    statuses = Table(
        title=f"Operations (finished in the last {WINDOW_S} s: {snap.finished_per_s:.1f}/s)",
        title_justify="left",
    )
    statuses.add_column("status")
    statuses.add_column("count", justify="right")
    for status in ("UNPROCESSED", "PROCESSING", "SUCCESS", "FAIL", "CANCELLED"):
        statuses.add_row(status, str(snap.statuses.get(status, 0)))

    failures = Table(title="Recent failures", title_justify="left")
    for column in ("when", "id", "operationType", "error"):
        failures.add_column(column, overflow="fold")
    for op_id, op_type, error, when in snap.failures:
        stamp = when.strftime("%Y-%m-%d %H:%M:%S") if when else ""
        failures.add_row(stamp, op_id, op_type, (error or "").splitlines()[0][:200])
    recurring = Table(title="Recurring operations (STREAMSVC_SCHEDULES)", title_justify="left")
    for column in ("name", "cron", "last run", "next run"):
        recurring.add_column(column)
    for name, cron, last, upcoming in snap.schedules:
        recurring.add_row(name, cron, _stamp(last) or "never", _stamp(upcoming))
    paused = Table(title="Paused operationTypes (stored, not applied)", title_justify="left")
    for column in ("operationType", "held", "paused by", "since"):
        paused.add_column(column, justify="right" if column == "held" else "left")
    for p in snap.paused:
        paused.add_row(p.operation_type, str(p.held), p.paused_by, _stamp(p.paused_at))
    return Group(depths, consumers, statuses, failures, recurring, paused)


def _stamp(when: dt.datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC") if when else ""
