"""The inbox, the sweeper, racing flushers and a notifier's lost answers, on the real Redis
and PostgreSQL."""

from __future__ import annotations

import json
import re

import anyio
import asyncpg
import pytest

from benchmarks import workload
from streamsvc.actors.heartbeat import Heartbeat
from streamsvc.adapters import streams as rs
from streamsvc.model import Outcome, Receipt, Status, outcomes_decoder, work_encoder
from streamsvc.settings import Settings
from streamsvc.supervisor import Service
from streamsvc.validate import ANONYMOUS
from tests.conftest import make_settings
from tests.pipeline import (
    drain,
    events_on,
    eventually,
    ops,
    order,
    post_batch,
    running,
    served_with_clients,
    statuses,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_inbox_rejects_malformed_entries_and_keeps_going(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    malformed = {
        "{not json": "JSON is malformed",
        json.dumps(
            {"operationType": "X", "table": "nope", "action": "insert", "values": {"id": 1}}
        ): "table: 'nope' is not an allowed table",
        json.dumps(
            {
                "operationType": "X",
                "table": "profiles",
                "action": "insert",
                "values": {"id": 1, "password_hash": "x"},
            }
        ): "values.password_hash: column not allowed",
        json.dumps(
            {"operationType": "X", "sql": "DELETE FROM orders; DELETE FROM payments"}
        ): "sql: must be exactly one statement, got 2",
        json.dumps({"operationType": "X", "sql": "DROP TABLE orders"}): "sql: only INSERT",
        json.dumps({"operationType": "X", "sql": "COMMIT"}): "got COMMIT",
    }
    async with running(settings) as service:
        inbox = service.streams.names.inbox
        redis = service.streams.redis
        await redis.xadd(inbox, {"op": json.dumps(order(1))})
        for raw in malformed:
            await redis.xadd(inbox, {"op": raw})
        await redis.xadd(inbox, {"nothing": "here"})
        await redis.xadd(inbox, {"op": json.dumps(order(2))})
        await service.inbox.run(burst=True)
        await drain(service)
        rejects = await redis.xrange(service.streams.names.rejects)
        assert await redis.xlen(inbox) == 0, "every entry is acked, good or bad"
    reasons = [fields[b"reason"].decode() for _, fields in rejects]
    assert len(reasons) == len(malformed) + 1
    for expected, reason in zip(
        [*malformed.values(), "op: entry has no `op` field"], reasons, strict=True
    ):
        assert expected in reason
    kept = [fields.get(b"op") for _, fields in rejects]
    assert kept[0] is None and kept[-1] is None, "what did not decode is not kept"
    decodable = [json.loads(m) for m in list(malformed)[1:]]
    assert [json.loads(k or b"") for k in kept[1:-1]] == decodable
    assert await conn.fetchval("SELECT array_agg(id ORDER BY id) FROM orders") == [1, 2]


async def test_inbox_entry_delivered_twice_is_stored_once(
    database: str, prefix: str, conn: asyncpg.Connection
) -> None:
    settings = make_settings(database, prefix, STREAMSVC_CLAIM_IDLE_MS="1")
    async with running(settings) as service:
        names, redis = service.streams.names, service.streams.redis
        for i in range(3):
            await redis.xadd(names.inbox, {"op": json.dumps(order(i))})
        await service.streams.ensure_group(names.inbox, rs.INGRESS_GROUP)
        # a consumer stores the entries, then dies before its ack
        taken = await service.streams.read(
            names.inbox, rs.INGRESS_GROUP, "dead", count=10, block_ms=None
        )
        await service.ingress.submit(
            ops([json.loads(f[b"op"]) for _, f in taken]),
            caller=ANONYMOUS,
            source="inbox",
            ids=[service_id(service, eid) for eid, _ in taken],
        )
        await anyio.sleep(0.01)  # past the 1 ms idle threshold
        await service.inbox.run(burst=True)  # takes the dead consumer's entries over
        await drain(service)
    assert await statuses(conn) == {"SUCCESS": 3}
    assert await conn.fetchval("SELECT count(*) FROM orders") == 3


async def test_inbox_readers_share_the_entries_and_store_each_once(
    database: str, prefix: str, conn: asyncpg.Connection
) -> None:
    settings = make_settings(
        database, prefix, STREAMSVC_INBOX_READERS="3", STREAMSVC_INGRESS_READ_COUNT="5"
    )
    async with running(settings) as service:
        names, redis = service.streams.names, service.streams.redis
        for i in range(60):
            await redis.xadd(names.inbox, {"op": json.dumps(order(i))})
        readers: dict[str, int] = {}
        read = service.streams.read

        async def counting(stream: str, group: str, consumer: str, **kw: object) -> list[rs.Entry]:
            entries = await read(stream, group, consumer, **kw)  # type: ignore[arg-type]
            if stream == names.inbox:
                readers[consumer] = readers.get(consumer, 0) + len(entries)
            return entries

        service.streams.read = counting  # type: ignore[method-assign]
        await service.inbox.run(burst=True)
        await drain(service)
        assert await redis.xlen(names.inbox) == 0
    assert sum(readers.values()) == 60, readers
    assert len(readers) == 3 and all(readers.values()), readers  # each took its share
    assert await statuses(conn) == {"SUCCESS": 60}
    assert await conn.fetchval("SELECT count(DISTINCT id) FROM orders") == 60


async def test_keyed_entries_wait_for_older_ones_a_dead_reader_held(
    database: str, prefix: str, conn: asyncpg.Connection
) -> None:
    """A reader that died holding a key's first operations (read, never stored): the
    later ones, read by a live reader, are stored only after those, once taken over."""
    settings = make_settings(database, prefix, STREAMSVC_CLAIM_IDLE_MS="1500")
    await conn.execute("INSERT INTO counters (name, value) VALUES ('row', 0)")

    def update(n: int) -> str:
        return json.dumps(
            {
                "operationType": "SET",
                "table": "counters",
                "action": "update",
                "values": {"value": n},
                "key": {"name": "row"},
                "orderingKey": "row",
            }
        )

    async with running(settings) as service:
        names, redis = service.streams.names, service.streams.redis
        await service.streams.ensure_group(names.inbox, rs.INGRESS_GROUP)
        for n in range(1, 4):
            await redis.xadd(names.inbox, {"op": update(n)})
        dead = await service.streams.read(
            names.inbox, rs.INGRESS_GROUP, "dead", count=10, block_ms=None
        )
        assert len(dead) == 3
        for n in range(4, 7):
            await redis.xadd(names.inbox, {"op": update(n)})
        await service.inbox.run(burst=True)
        await drain(service)
        assert await redis.xlen(names.inbox) == 0
    stored = await conn.fetch(
        """SELECT (body -> 'values' ->> 'value')::int FROM "BatchOperations"
           ORDER BY key_seq"""
    )
    assert [r[0] for r in stored] == [1, 2, 3, 4, 5, 6]
    assert await conn.fetchval("SELECT value FROM counters WHERE name = 'row'") == 6


def service_id(service: Service, entry_id: bytes) -> str:
    import uuid

    from streamsvc.api import inbox

    return str(uuid.uuid5(inbox._NAMESPACE, f"{service.streams.names.inbox}:{entry_id.decode()}"))


async def test_redis_losing_everything_loses_nothing(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    w = workload.build(2000)
    await workload.seed(conn, w)
    async with running(settings) as service:
        await service.ingress.submit(ops(w.ops[:1000]), caller=ANONYMOUS, source="api")
        await drain(service)
        await service.ingress.submit(ops(w.ops[1000:]), caller=ANONYMOUS, source="api")
        await service.streams.redis.flushall()  # the work stream and its group are gone

        async def recovered() -> bool:
            report = await service.sweeper.sweep()
            return report.reenqueued_rows > 0

        await eventually(recovered, within=10)
        await drain(service)
    await workload.verify(conn, w)
    assert await statuses(conn) == workload.expected_statuses(w)


async def test_outcomes_redis_lost_before_they_were_relayed_are_announced_again(
    database: str, prefix: str, conn: asyncpg.Connection
) -> None:
    """No notifier runs: every outcome waits on the outcome stream when Redis loses it."""
    settings = make_settings(database, prefix, BATCH_PROCESS_OPERATION_LIMIT="100")
    w = workload.build(250)
    await workload.seed(conn, w)
    async with running(settings) as service:
        await service.ingress.submit(ops(w.ops), caller=ANONYMOUS, source="api")
        await drain(service)
        await service.sweeper.sweep()  # a new Redis: its data is named
        await service.sweeper.sweep()  # the point, before the oldest outcome not relayed
        await service.streams.redis.flushall()
        report = await service.sweeper.sweep()
        names = service.streams.names
        entries = await service.streams.redis.xrange(names.outcomes)
        again = await service.sweeper.sweep()
    finished = {str(r[0]) for r in await conn.fetch('SELECT id FROM "BatchOperations"')}
    announced = [o.id for _, f in entries for o in outcomes_decoder.decode(f[b"o"])]
    assert report.reannounced == 250 and len(entries) == 3, "three pages of at most 100"
    assert sorted(announced) == sorted(finished)
    assert again.reannounced == 0


async def test_entries_of_a_dead_flusher_are_handed_out_again(
    database: str, prefix: str, conn: asyncpg.Connection
) -> None:
    settings = make_settings(database, prefix, STREAMSVC_CLAIM_IDLE_MS="50")
    async with running(settings) as service:
        await service.ingress.submit(
            ops([order(i) for i in range(10)]), caller=ANONYMOUS, source="api"
        )
        names = service.streams.names
        taken = await service.streams.read(
            names.work, rs.FLUSHER_GROUP, "dead", count=10, block_ms=None
        )
        assert taken, "the dead flusher took the entry and never acked it"

        async def handed_out() -> bool:
            return (await service.sweeper.sweep()).reenqueued_entries == 1

        await eventually(handed_out, within=5)
        await drain(service)
    assert await statuses(conn) == {"SUCCESS": 10}


async def test_an_operation_that_kills_its_flusher_is_cornered_and_dead_lettered(
    database: str, prefix: str, conn: asyncpg.Connection
) -> None:
    settings = make_settings(
        database, prefix, STREAMSVC_CLAIM_IDLE_MS="1", STREAMSVC_MAX_DELIVERIES="3"
    )
    async with running(settings) as service:
        results = await service.ingress.submit(
            ops([order(i) for i in range(8)]), caller=ANONYMOUS, source="api"
        )
        poison = results[5]
        assert isinstance(poison, Receipt)
        names, flusher = service.streams.names, service.flushers[0]
        for _ in range(40):
            entries = await service.streams.read(
                names.work, rs.FLUSHER_GROUP, "crashy", count=10, block_ms=None
            )
            for entry in entries:
                if poison.id.encode() not in entry[1][b"ops"]:
                    await flusher.handle([(names.work, entry)])  # the flusher survives these
            await anyio.sleep(0.005)
            await service.sweeper.sweep()
            if not await service.streams.length(names.work):
                break
        dead = await service.streams.redis.xrange(names.dead)
    assert len(dead) == 1
    assert re.fullmatch(
        rb"dead-lettered after \d+ deliveries without an ack", dead[0][1][b"reason"]
    )
    assert poison.id.encode() in dead[0][1][b"ops"]
    rows = dict(await conn.fetch('SELECT id::text, status FROM "BatchOperations"'))
    assert rows.pop(poison.id) == "FAIL"
    assert set(rows.values()) == {"SUCCESS"}
    assert await conn.fetchval("SELECT count(*) FROM orders") == 7


async def test_two_flushers_holding_the_same_entries_apply_them_once(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    w = workload.build(3000, seed=11)
    await workload.seed(conn, w)
    async with running(settings) as service:
        await service.ingress.submit(ops(w.ops), caller=ANONYMOUS, source="api")
        names = service.streams.names
        a, b = service.flushers[0], service.flushers[1]
        await service.streams.ensure_group(names.work, rs.FLUSHER_GROUP)
        entries = await service.streams.read(
            names.work, rs.FLUSHER_GROUP, a.name, count=100, block_ms=None
        )
        # b claims them as if a had gone quiet: both now hold the very same entries
        claimed = await service.streams.claim(
            names.work, rs.FLUSHER_GROUP, b.name, min_idle_ms=0, ids=[e[0] for e in entries]
        )
        assert len(claimed) == len(entries) == 3
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.handle, [(names.work, e) for e in entries])
            tg.start_soon(b.handle, [(names.work, e) for e in claimed])
        outcomes = await service.streams.redis.xrange(names.outcomes)
    await workload.verify(conn, w)
    assert await statuses(conn) == workload.expected_statuses(w)
    assert len(outcomes) >= 2, "both report; the second only re-reports what the first did"


async def test_concurrent_batches_on_hot_rows_do_not_deadlock(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    await conn.executemany("INSERT INTO counters VALUES ($1, 0)", [(f"h{i}",) for i in range(40)])
    # every update takes 5 ms, so the two batches surely hold locks at the same time
    await conn.execute("""
        CREATE FUNCTION slowly() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN PERFORM pg_sleep(0.005); RETURN NEW; END $$;
        CREATE TRIGGER slowly BEFORE UPDATE ON counters FOR EACH ROW EXECUTE FUNCTION slowly();
    """)
    bump = "UPDATE counters SET value = value + 1 WHERE name = $1"

    def batch(names: list[str]) -> list[dict[str, object]]:
        return [{"operationType": "BUMP", "sql": bump, "params": [n]} for n in names]

    names = [f"h{i}" for i in range(40)]
    async with running(settings) as service:
        await service.ingress.submit(ops(batch(names)), caller=ANONYMOUS, source="api")
        await service.ingress.submit(ops(batch(names[::-1])), caller=ANONYMOUS, source="api")
        work = service.streams.names.work
        a, b = service.flushers
        await service.streams.ensure_group(work, rs.FLUSHER_GROUP)
        first = await service.streams.read(work, rs.FLUSHER_GROUP, a.name, count=1, block_ms=None)
        second = await service.streams.read(work, rs.FLUSHER_GROUP, b.name, count=1, block_ms=None)
        async with service.pool.acquire(), service.pool.acquire():
            pass  # two warm connections, so neither flusher waits for a connect
        async with anyio.create_task_group() as tg:  # opposite lock orders, at the same time
            tg.start_soon(a.handle, [(work, e) for e in first])
            tg.start_soon(b.handle, [(work, e) for e in second])
    assert await conn.fetchval("SELECT sum(value) FROM counters WHERE name LIKE 'h%'") == 80
    attempts = {r[0] for r in await conn.fetch('SELECT attempts FROM "BatchOperations"')}
    assert attempts == {1}, "no batch had to be retried after a deadlock"


async def test_outcomes_a_lost_answer_left_with_a_live_notifier_are_announced(
    database: str, prefix: str
) -> None:
    """An outcome entry Redis delivered to the notifier by a read whose answer never came
    back (a connection cut after Redis ran it, or redis-py sending it again) sits in the
    notifier's own pending entries: it reads them again every heartbeat."""
    settings = make_settings(database, prefix, STREAMSVC_HEARTBEAT_MS="200")
    async with served_with_clients(settings) as served:
        events = await events_on(served, "ORDER_CREATED.SUCCESS")
        notifier = served.service.notifiers[0]
        outcomes = notifier.streams.names.outcomes
        process = rs.process_of(notifier.name)
        assert process is not None
        streams = served.service.streams  # its process alive: nobody else takes its entries
        await Heartbeat(streams.redis, streams.names, process, every_ms=60_000).beat()

        async def announced() -> bool:
            return (await events.get(fail=False, no_ack=True)) is not None

        await post_batch(served, order(1))  # the notifier is past its first reads
        await eventually(announced, within=10, every=0.05)
        done = Outcome("stranded-1", "ORDER_CREATED", Status.SUCCESS, None, 1, "b")
        async with served.service.streams.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(outcomes, {"o": work_encoder.encode([done])})
            pipe.xreadgroup(rs.NOTIFIER_GROUP, notifier.name, {outcomes: ">"}, count=10)
            await pipe.execute()  # delivered to the notifier, which never saw the answer
        seen: list[bytes] = []

        async def stranded_announced() -> bool:
            message = await events.get(fail=False, no_ack=True)
            if message is not None:
                seen.append(message.body)
            return any(b"stranded-1" in body for body in seen)

        await eventually(stranded_announced, within=5, every=0.05)
