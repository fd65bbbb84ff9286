-- Replays lock their rows in one order (streamsvc_replay as in 005 otherwise): `streamsvc
-- replay` run by several hands at once over the same operations must not deadlock.
CREATE OR REPLACE FUNCTION streamsvc_replay(ids uuid[])
RETURNS TABLE (id text, ready boolean, body text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    keyed uuid[];
BEGIN
    PERFORM streamsvc_lock_keys(array_agg(b.submitted_by), array_agg(b.ordering_key))
    FROM "BatchOperations" AS b
    WHERE b.id = ANY(ids) AND b.ordering_key IS NOT NULL AND b.status IN ('FAIL', 'CANCELLED');
    -- Then the rows, in id order (keys before rows, as every writer takes them): two
    -- replays of the same rows planned differently (an index scan in id order, a scan in
    -- table order) would otherwise lock them in two orders, deadlock, and one would fail.
    PERFORM 1 FROM "BatchOperations" AS b
    WHERE b.id = ANY(ids) AND b.status IN ('FAIL', 'CANCELLED')
    ORDER BY b.id
    FOR UPDATE;
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
