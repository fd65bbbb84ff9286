-- Pausing an operationType, and replaying finished operations (docs/queue.md says how
-- they work). As in 004, the function runs with its caller's rights.

-- The operationTypes an operator paused: their operations are stored as usual, and none is
-- applied until the type is resumed. A batch's claim reads this table under a SHARE lock
-- (sql/batch.sql, streamsvc_claim), so pausing waits for the batches that read it before
-- and, once it answers, no batch applies that type any more.
CREATE TABLE streamsvc_paused_types (
    operation_type text PRIMARY KEY,
    paused_by      text        NOT NULL,
    paused_at      timestamptz NOT NULL DEFAULT now()
);

-- paused: a pending operation a claim refused because its type was paused; it is off the
-- work streams until its type is resumed. history: each earlier ending of a replayed
-- operation ({status, error, attempts, batchId, endedAt}), oldest first.
ALTER TABLE "BatchOperations"
    ADD COLUMN paused  boolean NOT NULL DEFAULT false,
    ADD COLUMN history jsonb   NOT NULL DEFAULT '[]';

-- A resume takes a type's paused operations in the order they were stored: key_seq
-- numbers every operation stored from now on in that order (a group commit's share one
-- created_at), no longer only those with an orderingKey (streamsvc_intake, below).
CREATE INDEX "BatchOperations_paused_idx" ON "BatchOperations" (operation_type, key_seq)
    WHERE paused;

-- The sweeper's pending rows that should be on a stream: paused ones are not.
DROP INDEX "BatchOperations_pending_idx";
CREATE INDEX "BatchOperations_pending_idx" ON "BatchOperations" (updated_at)
    WHERE status IN ('UNPROCESSED', 'PROCESSING') AND wake_at IS NULL AND NOT parked
      AND NOT paused;

-- Take the locks of the keys (submitters[n], keys[n]) (the NULL keys ignored), one by one in
-- one order, so that transactions taking several cannot deadlock (see 004).
CREATE FUNCTION streamsvc_lock_keys(submitters text[], keys text[])
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    k record;
BEGIN
    FOR k IN
        SELECT DISTINCT u.s, u.k FROM unnest(submitters, keys) AS u(s, k)
        WHERE u.k IS NOT NULL ORDER BY 1, 2
    LOOP
        PERFORM pg_advisory_xact_lock(1398035021, hashtext(k.s || ':' || k.k));
    END LOOP;
END
$$;

-- Replay the operations `ids` that ended FAIL or CANCELLED (others are left as they are):
-- pending again under the same id, attempts kept, the ending they leave kept in history
-- (the last 50: a caller retrying its own failing operation for ever cannot grow its row
-- without bound).
-- Each replayed one comes back as (id, ready, body): ready (with its body) when it goes on
-- a work stream now. One whose runAt is ahead waits for it again; one with an orderingKey
-- goes behind its key's pending operations (under the key's lock, as streamsvc_intake
-- stores one), and comes back a second time, ready, when it is its key's head.
CREATE FUNCTION streamsvc_replay(ids uuid[])
RETURNS TABLE (id text, ready boolean, body text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    keyed uuid[];
BEGIN
    PERFORM streamsvc_lock_keys(array_agg(b.submitted_by), array_agg(b.ordering_key))
    FROM "BatchOperations" AS b
    WHERE b.id = ANY(ids) AND b.ordering_key IS NOT NULL AND b.status IN ('FAIL', 'CANCELLED');
    -- SET reads the row as it was: history records the ending being left.
    RETURN QUERY
    WITH replayed AS (
        UPDATE "BatchOperations" AS b
        SET status = 'UNPROCESSED', error = NULL, batch_id = NULL, processed_at = NULL,
            updated_at = now(), paused = false,
            history = jsonb_path_query_array(
                b.history || jsonb_build_array(jsonb_build_object(
                    'status', b.status, 'error', b.error, 'attempts', b.attempts,
                    'batchId', b.batch_id, 'endedAt', b.processed_at)),
                '$[last - 49 to last]'),
            parked = b.ordering_key IS NOT NULL,
            key_seq = nextval('"BatchOperations_key_seq"'),
            wake_at = CASE WHEN b.ordering_key IS NULL AND b.run_at > clock_timestamp()
                           THEN b.run_at END
        WHERE b.id = ANY(ids) AND b.status IN ('FAIL', 'CANCELLED')
        RETURNING b.id, NOT b.parked AND b.wake_at IS NULL AS ready, b.body
    )
    SELECT r.id::text, r.ready, CASE WHEN r.ready THEN r.body::text END FROM replayed AS r;
    keyed := ARRAY(
        SELECT b.id FROM "BatchOperations" AS b
        WHERE b.id = ANY(ids) AND b.parked AND b.status = 'UNPROCESSED');
    IF cardinality(keyed) > 0 THEN
        RETURN QUERY SELECT r.id, true, r.body FROM streamsvc_release_keys(keyed) AS r;
    END IF;
END
$$;

-- As in 004, but every operation takes the next key_seq, in the order of ids (and the key
-- locks are taken by streamsvc_lock_keys).
CREATE OR REPLACE FUNCTION streamsvc_intake(
    ids uuid[], types text[], bodies text[], priorities smallint[], run_ats timestamptz[],
    keys text[], sources text[], submitters text[])
RETURNS TABLE (id text, created boolean, ready boolean, body text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    keyed uuid[];
BEGIN
    keyed := ARRAY(SELECT u.id FROM unnest(ids, keys) AS u(id, k) WHERE u.k IS NOT NULL);
    PERFORM streamsvc_lock_keys(submitters, keys);
    RETURN QUERY
    INSERT INTO "BatchOperations" AS b (
        id, operation_type, body, priority, run_at, ordering_key, source, submitted_by,
        parked, key_seq, wake_at)
    SELECT u.id, u.operation_type, u.body::jsonb, u.priority, u.run_at, u.ordering_key,
           u.source, u.submitted_by, u.ordering_key IS NOT NULL,
           nextval('"BatchOperations_key_seq"'),
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
