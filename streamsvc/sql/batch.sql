-- A batch transaction's bookkeeping in "BatchOperations", and the call that carries it
-- together with the batch's statements, so that a batch makes fewer round trips. Not a
-- migration: like apply_rows.sql, every connection of a flushing process creates these in
-- its own temporary schema (pg_temp), each revoked from PUBLIC as it is created (the caller
-- role must not execute them). The bookkeeping keeps the search_path it was created with:
-- a caller's statement earlier in the batch cannot make "BatchOperations" unresolvable.

-- Claim the batch's rows still pending, marking them SUCCESS: the effects and this mark
-- commit together (the refused are marked FAIL before the commit). Only rows that may be
-- applied now: not parked behind their key's earlier operations, not held for a runAt
-- still ahead, their operationType not paused. The paused types are read under a SHARE
-- lock held to the commit: a pause or resume (a write to that table) waits for the
-- batches that read it, so no batch applies a type after its pause answered, and the
-- batch's not-claimed rows (queries.sql, not_claimed) see the types its claim saw.
-- A row another flusher
-- is finishing is waited for, then skipped as no longer pending. `id = ANY(ids)` finds the
-- rows by primary key (joined to an unnest alone, a batch of 1,000 is planned as a hash
-- join over a scan of the whole table), and only by it: "pending" is written as not
-- finished, which the pending rows' partial index does not cover, and sequential scans
-- are off here. Otherwise the planner may scan every pending row for each claim (all of
-- a backlog), or the whole table. That wait is a lock wait, as the table locks'
-- (streamsvc_lock_tables): should the statement timeout (or a cancel) end it, it comes out
-- as 55P03, lock_not_available.
CREATE FUNCTION pg_temp.streamsvc_claim(ids uuid[], batch uuid)
RETURNS TABLE (op_id text, attempts integer)
LANGUAGE plpgsql SET search_path FROM CURRENT SET enable_seqscan = off AS $$
BEGIN
    LOCK TABLE streamsvc_paused_types IN SHARE MODE;
    RETURN QUERY
    UPDATE "BatchOperations" AS b
    SET status = 'SUCCESS', error = NULL, attempts = b.attempts + 1, batch_id = batch,
        processed_at = clock_timestamp(), updated_at = now()
    WHERE b.id = ANY(ids) AND b.status NOT IN ('SUCCESS', 'FAIL', 'CANCELLED')
      AND NOT b.parked AND b.wake_at IS NULL AND NOT b.paused
      AND (b.run_at IS NULL OR b.run_at <= clock_timestamp())
      AND NOT EXISTS (SELECT FROM streamsvc_paused_types AS p
                      WHERE p.operation_type = b.operation_type)
    RETURNING b.id::text, b.attempts;
EXCEPTION WHEN query_canceled THEN
    RAISE EXCEPTION 'waiting for the batch''s rows: %', SQLERRM
        USING ERRCODE = 'lock_not_available';
END
$$;
REVOKE EXECUTE ON FUNCTION pg_temp.streamsvc_claim(uuid[], uuid) FROM PUBLIC;

-- The refused among the claimed rows, marked FAIL before the commit (`b.id = ANY(ids)`:
-- by primary key, as in streamsvc_claim).
CREATE FUNCTION pg_temp.streamsvc_mark_failed(ids uuid[], errors text[])
RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE "BatchOperations" AS b SET status = 'FAIL', error = u.error
    FROM unnest(ids, errors) AS u(id, error)
    WHERE b.id = u.id AND b.id = ANY(ids);
END
$$;
REVOKE EXECUTE ON FUNCTION pg_temp.streamsvc_mark_failed(uuid[], text[]) FROM PUBLIC;

-- One call of a batch transaction: statements over their rows, applied as
-- streamsvc_apply_groups does (table locks first), with the bookkeeping around them.
-- - claim_ids (a batch's first call): claim these rows first; when any of them had
--   finished already, stop there: the caller plans again without them. The claimed rows
--   come back as (op_id, attempts).
-- - mark_ids (a batch's last call): each statement's operation ids, comma-separated, in
--   the order of its rows; every refused row is marked FAIL with its message, and so are
--   failed_ids with failed_errors (refused earlier in the batch).
-- `each` says which statements are callers' (see streamsvc_apply_groups). Each refused row
-- comes back as (group_index, row_position, error_state, error_message).
CREATE FUNCTION pg_temp.streamsvc_apply_batch(
    claim_ids uuid[], batch uuid, tables text[], statements text[], rows text[],
    each boolean[], mark_ids text[], failed_ids uuid[], failed_errors text[])
RETURNS TABLE (op_id text, attempts integer, group_index integer, row_position integer,
               error_state text, error_message text)
LANGUAGE plpgsql AS $$
DECLARE
    claimed integer;
    refused record;
BEGIN
    IF claim_ids IS NOT NULL THEN
        RETURN QUERY SELECT c.op_id, c.attempts, NULL::integer, NULL::integer, NULL::text,
                            NULL::text
            FROM pg_temp.streamsvc_claim(claim_ids, batch) AS c;
        GET DIAGNOSTICS claimed = ROW_COUNT;
        IF claimed < cardinality(claim_ids) THEN
            RETURN;
        END IF;
    END IF;
    FOR refused IN
        SELECT * FROM pg_temp.streamsvc_apply_groups(tables, statements, rows, each)
    LOOP
        op_id := NULL;
        attempts := NULL;
        group_index := refused.group_index;
        row_position := refused.row_position;
        error_state := refused.error_state;
        error_message := refused.error_message;
        RETURN NEXT;
        IF mark_ids IS NOT NULL THEN
            failed_ids := failed_ids || (string_to_array(
                mark_ids[refused.group_index], ','))[refused.row_position]::uuid;
            failed_errors := failed_errors || refused.error_message;
        END IF;
    END LOOP;
    IF mark_ids IS NOT NULL AND cardinality(failed_ids) > 0 THEN
        PERFORM pg_temp.streamsvc_mark_failed(failed_ids, failed_errors);
    END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION pg_temp.streamsvc_apply_batch(
    uuid[], uuid, text[], text[], text[], boolean[], text[], uuid[], text[]) FROM PUBLIC;
