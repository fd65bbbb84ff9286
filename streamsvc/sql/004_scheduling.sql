-- Scheduling, cancelling and per-key ordering (docs/scheduling.md says how they work).
-- The functions below run with their caller's rights (SECURITY INVOKER): only a role that
-- may change "BatchOperations" can use them, which the caller role may not.

-- CANCELLED: final, cancelled before it was applied.
ALTER TABLE "BatchOperations" DROP CONSTRAINT "BatchOperations_status_check";
ALTER TABLE "BatchOperations" ADD CONSTRAINT "BatchOperations_status_check"
    CHECK (status IN ('UNPROCESSED', 'PROCESSING', 'SUCCESS', 'FAIL', 'CANCELLED'));

-- A pending operation is on a work stream unless one of these holds it back:
-- - wake_at: its runAt is still ahead; a scheduler puts it on a work stream then.
-- - parked: an earlier operation with its orderingKey has not finished; the transaction
--   that finishes that one takes this one out (streamsvc_release_keys).
-- key_seq orders the operations of one orderingKey as they were stored.
ALTER TABLE "BatchOperations"
    ADD COLUMN wake_at timestamptz,
    ADD COLUMN parked  boolean NOT NULL DEFAULT false,
    ADD COLUMN key_seq bigint;

CREATE SEQUENCE "BatchOperations_key_seq" OWNED BY "BatchOperations".key_seq;

-- What is due next; finished and released rows leave this index.
CREATE INDEX "BatchOperations_wake_idx" ON "BatchOperations" (wake_at)
    WHERE wake_at IS NOT NULL;

-- The pending operations of a key (its caller's, see below), in their order.
CREATE INDEX "BatchOperations_key_idx"
    ON "BatchOperations" (submitted_by, ordering_key, key_seq)
    WHERE ordering_key IS NOT NULL AND status IN ('UNPROCESSED', 'PROCESSING');

-- The sweeper looks for pending rows that should be on a stream and were not touched for
-- a while: held-back rows are not among them.
DROP INDEX "BatchOperations_pending_idx";
CREATE INDEX "BatchOperations_pending_idx" ON "BatchOperations" (updated_at)
    WHERE status IN ('UNPROCESSED', 'PROCESSING') AND wake_at IS NULL AND NOT parked;

-- The last tick of each recurring operation (STREAMSVC_SCHEDULES) that was submitted.
CREATE TABLE streamsvc_schedule_ticks (
    name       text PRIMARY KEY,
    last_tick  timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- An orderingKey belongs to the caller that sent it: one caller's key never holds back
-- another's operations, whatever string they chose. A key's identity is therefore
-- (submitted_by, ordering_key); its lock, the advisory lock below.

-- The head of each key of the operations `ids` (its earliest pending operation), when
-- parked, is taken out: held for its runAt when that is ahead, else returned (id, body) to
-- be put on a work stream. Every transaction that stores or finishes operations with a
-- key calls this after, so a key's head is never parked and the rest of its pending
-- operations always are. The key locks, taken in one order, make storing and finishing one
-- key's operations take turns: a transaction that parks an operation behind a head commits
-- before the head's finisher looks for the next one, or after it (and then sees no pending
-- head, and stores its own first operation as the head).
CREATE FUNCTION streamsvc_release_keys(ids uuid[])
RETURNS TABLE (id text, body text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    k record;
BEGIN
    FOR k IN
        SELECT DISTINCT b.submitted_by, b.ordering_key FROM "BatchOperations" AS b
        WHERE b.id = ANY(ids) AND b.ordering_key IS NOT NULL
        ORDER BY 1, 2
    LOOP
        PERFORM pg_advisory_xact_lock(1398035021, hashtext(k.submitted_by || ':' || k.ordering_key));
    END LOOP;
    RETURN QUERY
    WITH keys AS (
        SELECT DISTINCT b.submitted_by, b.ordering_key FROM "BatchOperations" AS b
        WHERE b.id = ANY(ids) AND b.ordering_key IS NOT NULL
    ), heads AS (
        SELECT h.id, h.parked
        FROM keys AS k
        CROSS JOIN LATERAL (
            SELECT b.id, b.parked FROM "BatchOperations" AS b
            WHERE b.submitted_by = k.submitted_by AND b.ordering_key = k.ordering_key
              AND b.status IN ('UNPROCESSED', 'PROCESSING')
            ORDER BY b.key_seq
            LIMIT 1
        ) AS h
    ), released AS (
        UPDATE "BatchOperations" AS b
        SET parked = false, updated_at = now(),
            wake_at = CASE WHEN b.run_at > clock_timestamp() THEN b.run_at END
        FROM heads
        WHERE b.id = heads.id AND heads.parked
          AND b.parked AND b.status IN ('UNPROCESSED', 'PROCESSING')
        RETURNING b.id, b.wake_at, b.body
    )
    SELECT r.id::text, r.body::text FROM released AS r WHERE r.wake_at IS NULL;
END
$$;

-- Store operations (as many as a group commit holds): new ids come back as (id, true,
-- ready), ready when the operation goes on a work stream now (neither held for its runAt
-- nor parked behind its key's earlier operations). An id seen before is left as it is. A
-- key's operations are stored parked, then its head released as every key's is (rows
-- (id, false, true, body)).
CREATE FUNCTION streamsvc_intake(
    ids uuid[], types text[], bodies text[], priorities smallint[], run_ats timestamptz[],
    keys text[], sources text[], submitters text[])
RETURNS TABLE (id text, created boolean, ready boolean, body text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    k record;
    keyed uuid[];
BEGIN
    keyed := ARRAY(SELECT u.id FROM unnest(ids, keys) AS u(id, k) WHERE u.k IS NOT NULL);
    FOR k IN
        SELECT DISTINCT u.s, u.k FROM unnest(submitters, keys) AS u(s, k)
        WHERE u.k IS NOT NULL ORDER BY 1, 2
    LOOP
        PERFORM pg_advisory_xact_lock(1398035021, hashtext(k.s || ':' || k.k));
    END LOOP;
    RETURN QUERY
    INSERT INTO "BatchOperations" AS b (
        id, operation_type, body, priority, run_at, ordering_key, source, submitted_by,
        parked, key_seq, wake_at)
    SELECT u.id, u.operation_type, u.body::jsonb, u.priority, u.run_at, u.ordering_key,
           u.source, u.submitted_by, u.ordering_key IS NOT NULL,
           CASE WHEN u.ordering_key IS NOT NULL THEN nextval('"BatchOperations_key_seq"') END,
           CASE WHEN u.ordering_key IS NULL AND u.run_at > clock_timestamp() THEN u.run_at END
    FROM unnest(ids, types, bodies, priorities, run_ats, keys, sources, submitters)
         WITH ORDINALITY
         AS u(id, operation_type, body, priority, run_at, ordering_key, source, submitted_by, n)
    ORDER BY u.n
    ON CONFLICT ON CONSTRAINT "BatchOperations_pkey" DO NOTHING
    RETURNING b.id::text, true, NOT b.parked AND b.wake_at IS NULL, NULL::text;
    IF cardinality(keyed) > 0 THEN
        RETURN QUERY SELECT r.id, false, true, r.body FROM streamsvc_release_keys(keyed) AS r;
    END IF;
END
$$;
