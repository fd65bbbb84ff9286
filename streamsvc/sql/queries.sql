-- Every statement the service runs on "BatchOperations" and its own tables, by name.
-- streamsvc.store.queries reads this file: a query is the text between its `-- name:`
-- line and the next one; the comment lines under the name say what it does.
--
-- Statements that find rows by id write "pending" as `status NOT IN (the final ones)`
-- where they also ask for rows neither parked nor held: written as `status IN (...)`, the
-- condition would match the pending rows' partial index, and the planner may scan all of
-- them (a whole backlog) instead of looking the ids up by primary key (sql/batch.sql,
-- streamsvc_claim, says the same).

-- name: intake
-- Store a group commit's operations (sql/004_scheduling.sql, streamsvc_intake).
SELECT id, created, ready, body
FROM streamsvc_intake($1::uuid[], $2::text[], $3::text[], $4::int2[], $5::timestamptz[],
                      $6::text[], $7::text[], $8::text[])

-- name: states
-- Where operations stand, by id.
SELECT id::text AS id, operation_type, status, error, attempts, batch_id::text AS batch_id
FROM "BatchOperations" WHERE id = ANY($1::uuid[])

-- name: get_operation
-- One operation by its id or its caller's userOperationId, seen by $2 (NULL: by anyone);
-- an id match first, then the looker's own ($3), then the oldest.
SELECT id::text AS id, operation_type, status, error, attempts, priority, source,
       batch_id::text AS batch_id, run_at, ordering_key, created_at, updated_at, processed_at,
       body::text AS body, paused, history::text AS history
FROM "BatchOperations"
WHERE (id = $1::uuid OR user_operation_id = $1::uuid)
  AND ($2::text IS NULL OR submitted_by = $2::text)
ORDER BY id = $1::uuid DESC, submitted_by = $3::text DESC, created_at
LIMIT 1

-- Lists of operations are built per shape (streamsvc/store/listing.py); these count them.
-- Each reads the window's entries of one index of sql/007_list_indexes.sql, and only the
-- index: `status = ANY(every status)` holds for every row (the status CHECK), and puts
-- status, the index's column before created_at, in the index condition. (Grouped by
-- status first: grouped by operationType first, the planner may prefer reading all of a
-- caller's entries in the order of the caller's index by type.)

-- name: count_statuses
-- Operations created in [$1, $2), by status.
SELECT status, count(*) AS count FROM "BatchOperations"
WHERE status = ANY('{UNPROCESSED,PROCESSING,SUCCESS,FAIL,CANCELLED}'::text[])
  AND created_at >= $1 AND created_at < $2
GROUP BY status

-- name: count_statuses_of
-- Operations submitted by $3 and created in [$1, $2), by status.
SELECT status, count(*) AS count FROM "BatchOperations"
WHERE submitted_by = $3
  AND status = ANY('{UNPROCESSED,PROCESSING,SUCCESS,FAIL,CANCELLED}'::text[])
  AND created_at >= $1 AND created_at < $2
GROUP BY status

-- name: count_types
-- Operations created in [$1, $2), by operationType and status.
SELECT operation_type, status, count(*) AS count FROM "BatchOperations"
WHERE status = ANY('{UNPROCESSED,PROCESSING,SUCCESS,FAIL,CANCELLED}'::text[])
  AND created_at >= $1 AND created_at < $2
GROUP BY status, operation_type

-- name: count_types_of
-- Operations submitted by $3 and created in [$1, $2), by operationType and status.
SELECT operation_type, status, count(*) AS count FROM "BatchOperations"
WHERE submitted_by = $3
  AND status = ANY('{UNPROCESSED,PROCESSING,SUCCESS,FAIL,CANCELLED}'::text[])
  AND created_at >= $1 AND created_at < $2
GROUP BY status, operation_type

-- name: throughput
-- Operations finished in each of the last $1 minutes (the current one last, so far),
-- zeros included; the finished rows' index on processed_at.
WITH finished AS (
    SELECT date_trunc('minute', processed_at) AS start, count(*) AS finished
    FROM "BatchOperations"
    WHERE status IN ('SUCCESS', 'FAIL', 'CANCELLED')
      AND processed_at >= date_trunc('minute', now()) - make_interval(mins => $1 - 1)
    GROUP BY 1
)
SELECT m.start, coalesce(f.finished, 0) AS finished
FROM generate_series(date_trunc('minute', now()) - make_interval(mins => $1 - 1),
                     date_trunc('minute', now()), interval '1 minute') AS m(start)
LEFT JOIN finished AS f USING (start)
ORDER BY m.start

-- name: apply_batch
-- A batch's statements, their refused rows searched out inside PostgreSQL, in one round
-- trip (sql/apply_rows.sql, sql/batch.sql): the table locks first (an empty list when
-- taken already), then each statement over its rows (a JSON array in text), as the caller
-- role: a multi-row statement over all its rows, or (each: true) a caller's statement once
-- per row, a row holding its parameters. The rows a statement accepts are applied; each
-- refused one returns with its statement's index, its position, SQLSTATE and message. A
-- batch's first call also claims its rows (claim ids, else NULL) and stops when any could
-- not be claimed; its last call also marks the refused FAIL (each statement's operation
-- ids, comma-separated, else NULL; and the ids and errors refused earlier in the batch).
-- Arguments: claim ids, batch id, tables, statements, rows, each, mark ids, failed ids,
-- failed errors.
SELECT op_id, attempts, group_index, row_position, error_state, error_message
FROM pg_temp.streamsvc_apply_batch($1::uuid[], $2::uuid, $3::text[], $4::text[], $5::text[],
                                   $6::boolean[], $7::text[], $8::uuid[], $9::text[])

-- name: lock_tables
-- Batches writing the same table apply one after the other (sql/apply_rows.sql):
-- `tables` sorted.
SELECT pg_temp.streamsvc_lock_tables($1::text[])

-- name: mark_failed
-- The refused among a batch's claimed rows, marked FAIL before its commit.
SELECT pg_temp.streamsvc_mark_failed($1::uuid[], $2::text[])

-- name: claim_batch
-- Claim a batch's pending rows, marking them SUCCESS (sql/batch.sql).
SELECT op_id, attempts FROM pg_temp.streamsvc_claim($1::uuid[], $2::uuid)

-- name: release_keys
-- The heads of the keys of these operations, when parked, taken out; those due now come
-- back to be put on a work stream (sql/004_scheduling.sql).
SELECT id, body FROM streamsvc_release_keys($1::uuid[])

-- name: clean_session
-- After a batch that ran callers' statements: what they may have left on the session for
-- the next user of the connection (settings changed with set_config(..., false), session
-- advisory locks, a statement prepared for them that a timeout left behind). RESET ALL
-- returns every setting to the connection's start-up value.
RESET ALL; SELECT pg_advisory_unlock_all(), pg_temp.streamsvc_forget_statement()

-- name: not_claimed
-- The rows of a batch its claim left alone: finished ones, to report again; pending ones
-- are held back (parked, not due, or of a paused type) and are not on a stream any more.
-- A row whose runAt is still ahead (put on a stream early, as a clock ahead of the
-- database's can) goes back to waiting for it; one of a paused type is marked paused,
-- until its type is resumed (the batch's claim read the paused types under a lock it
-- still holds, so this sees the same ones).
WITH held AS (
    UPDATE "BatchOperations" AS b
    SET wake_at = CASE WHEN b.run_at > t.now THEN b.run_at END,
        paused = b.run_at IS NULL OR b.run_at <= t.now,
        updated_at = now()
    FROM (SELECT clock_timestamp() AS now) AS t
    WHERE b.id = ANY($1::uuid[]) AND b.status NOT IN ('SUCCESS', 'FAIL', 'CANCELLED')
      AND NOT b.parked AND b.wake_at IS NULL AND NOT b.paused
      AND (b.run_at > t.now
           OR b.operation_type IN (SELECT operation_type FROM streamsvc_paused_types))
    RETURNING b.id
)
SELECT id::text AS id, operation_type, status, error, attempts, batch_id::text AS batch_id
FROM "BatchOperations"
WHERE id = ANY($1::uuid[]) AND status IN ('SUCCESS', 'FAIL', 'CANCELLED')

-- name: count_attempt
-- Count a transient failure on rows still pending; they stay on their stream to be
-- tried again.
UPDATE "BatchOperations"
SET status = 'PROCESSING', attempts = attempts + 1, error = $2, updated_at = now()
WHERE id = ANY($1::uuid[]) AND status IN ('UNPROCESSED', 'PROCESSING')

-- name: touch_pending
-- Mark pending rows as just put on a stream again (keeps the sweeper's staleness rule
-- true).
UPDATE "BatchOperations" SET updated_at = now()
WHERE id = ANY($1::uuid[]) AND status IN ('UNPROCESSED', 'PROCESSING')

-- name: fail_pending
-- End rows still pending as FAIL (retries exhausted, or dead-lettered); not those held
-- back (parked, or waiting for their runAt), which no batch held.
UPDATE "BatchOperations"
SET status = 'FAIL', error = $2, processed_at = clock_timestamp(), updated_at = now()
WHERE id = ANY($1::uuid[]) AND status NOT IN ('SUCCESS', 'FAIL', 'CANCELLED')
  AND NOT parked AND wake_at IS NULL AND NOT paused
RETURNING id::text AS id, operation_type, attempts, body -> 'meta' AS meta,
          ordering_key IS NOT NULL AS keyed, (body ->> 'userOperationId') AS user_operation_id

-- name: stale
-- Pending rows that should be on a stream and were untouched since before $1: touched
-- and handed back to be put on one again.
UPDATE "BatchOperations" SET updated_at = now()
WHERE id IN (
    SELECT id FROM "BatchOperations"
    WHERE status IN ('UNPROCESSED', 'PROCESSING') AND wake_at IS NULL AND NOT parked
      AND NOT paused AND updated_at < $1
    ORDER BY updated_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
RETURNING id::text AS id, body::text AS body

-- name: due
-- Operations whose runAt comes within $1 seconds, taken by one scheduler (SKIP LOCKED:
-- another takes others): no longer held, touched (as put on a stream), with the seconds
-- left until each is due by the database's clock.
UPDATE "BatchOperations" AS b SET wake_at = NULL, updated_at = now()
FROM (
    SELECT id FROM "BatchOperations"
    WHERE wake_at <= clock_timestamp() + make_interval(secs => $1)
    ORDER BY wake_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
) AS due
WHERE b.id = due.id
RETURNING b.id::text AS id, b.body::text AS body,
          greatest(0, extract(epoch FROM b.run_at - clock_timestamp()))::float8 AS wait_s

-- name: hold_again
-- Operations a scheduler took and will not put on a stream (it is stopping): held for
-- their runAt again.
UPDATE "BatchOperations" SET wake_at = run_at
WHERE id = ANY($1::uuid[]) AND status NOT IN ('SUCCESS', 'FAIL', 'CANCELLED')
  AND wake_at IS NULL AND NOT parked AND run_at IS NOT NULL

-- name: find
-- The operation a caller names (by id or userOperationId, seen by $2), as get_operation.
SELECT id::text AS id, ordering_key
FROM "BatchOperations"
WHERE (id = $1::uuid OR user_operation_id = $1::uuid)
  AND ($2::text IS NULL OR submitted_by = $2::text)
ORDER BY id = $1::uuid DESC, submitted_by = $3::text DESC, created_at
LIMIT 1

-- name: stuck_keys
-- Heads of keys (a caller's orderingKey) that are parked: their turn came and nobody
-- released them (a crash between a cancel and the release after it). At most $1.
SELECT id::text AS id FROM (
    SELECT DISTINCT ON (submitted_by, ordering_key) id, parked FROM "BatchOperations"
    WHERE ordering_key IS NOT NULL AND status IN ('UNPROCESSED', 'PROCESSING')
    ORDER BY submitted_by, ordering_key, key_seq
) AS heads
WHERE parked
LIMIT $1

-- name: cancel
-- Cancel one operation that has not been applied.
UPDATE "BatchOperations"
SET status = 'CANCELLED', processed_at = clock_timestamp(), updated_at = now(),
    wake_at = NULL, parked = false, paused = false
WHERE id = $1::uuid AND status IN ('UNPROCESSED', 'PROCESSING')
RETURNING id::text AS id, operation_type, attempts, body -> 'meta' AS meta,
          ordering_key IS NOT NULL AS keyed, (body ->> 'userOperationId') AS user_operation_id

-- name: replay
-- Replay the operations $1 that ended FAIL or CANCELLED (sql/005_queue_management.sql).
SELECT id, ready, body FROM streamsvc_replay($1::uuid[])

-- name: replayable
-- Up to $6 operations that ended with a status of $1, of operationType $2 (NULL: any),
-- ended in [$3, $4), submitted by $5 (NULL: anyone), the earliest ended first. A replay
-- takes them page by page until none is left (the replayed are pending, so out of it).
SELECT id::text AS id FROM "BatchOperations"
WHERE status = ANY($1::text[])
  AND ($2::text IS NULL OR operation_type = $2::text)
  AND processed_at >= $3::timestamptz AND processed_at < $4::timestamptz
  AND ($5::text IS NULL OR submitted_by = $5::text)
ORDER BY processed_at, id
LIMIT $6

-- name: count_replayable
-- How many operations replayable would give, for a dry run.
SELECT count(*) FROM "BatchOperations"
WHERE status = ANY($1::text[])
  AND ($2::text IS NULL OR operation_type = $2::text)
  AND processed_at >= $3::timestamptz AND processed_at < $4::timestamptz
  AND ($5::text IS NULL OR submitted_by = $5::text)

-- name: pause
-- Pause an operationType (waits for the batches applying it: sql/batch.sql,
-- streamsvc_claim); the time it was paused, whether now or before.
INSERT INTO streamsvc_paused_types AS p (operation_type, paused_by) VALUES ($1, $2)
ON CONFLICT (operation_type) DO UPDATE SET paused_at = p.paused_at
RETURNING paused_at

-- name: resume
-- Resume an operationType; NULL when it was not paused.
DELETE FROM streamsvc_paused_types WHERE operation_type = $1 RETURNING paused_at

-- name: paused_types
-- The paused operationTypes, and how many operations each holds back.
SELECT p.operation_type, p.paused_by, p.paused_at,
       (SELECT count(*) FROM "BatchOperations" AS b
        WHERE b.paused AND b.operation_type = p.operation_type) AS held
FROM streamsvc_paused_types AS p
ORDER BY p.operation_type

-- name: unpause
-- Up to $2 held operations of operationType $1, now that it is resumed, in the order they
-- were stored: no longer held, touched (as put on a stream); none while $1 is paused again.
UPDATE "BatchOperations" AS b SET paused = false, updated_at = now()
FROM (
    SELECT id FROM "BatchOperations"
    WHERE paused AND operation_type = $1
      AND NOT EXISTS (SELECT FROM streamsvc_paused_types WHERE operation_type = $1)
    ORDER BY key_seq
    LIMIT $2
    FOR UPDATE SKIP LOCKED
) AS r
WHERE b.id = r.id
RETURNING b.id::text AS id, b.body::text AS body, b.key_seq

-- name: stray_paused
-- Up to $1 operations held for a type that is no longer paused (a resume stopped half way):
-- the sweeper lets them go as a resume would.
UPDATE "BatchOperations" AS b SET paused = false, updated_at = now()
FROM (
    SELECT id FROM "BatchOperations" AS h
    WHERE paused
      AND NOT EXISTS (SELECT FROM streamsvc_paused_types AS p
                      WHERE p.operation_type = h.operation_type)
    ORDER BY key_seq
    LIMIT $1
    FOR UPDATE SKIP LOCKED
) AS r
WHERE b.id = r.id
RETURNING b.id::text AS id, b.body::text AS body, b.key_seq

-- name: status_counts
SELECT status, count(*) AS count FROM "BatchOperations" GROUP BY status

-- name: recent_failures
SELECT id::text AS id, operation_type, error, processed_at FROM "BatchOperations"
WHERE status = 'FAIL' ORDER BY processed_at DESC NULLS LAST LIMIT $1

-- name: finished_since
SELECT count(*) FROM "BatchOperations"
WHERE processed_at >= now() - make_interval(secs => $1)
  AND status IN ('SUCCESS', 'FAIL', 'CANCELLED')

-- name: last_ticks
-- The last tick of every recurring operation that was submitted.
SELECT name, last_tick FROM streamsvc_schedule_ticks

-- name: record_tick
-- A recurring operation's tick was submitted (ticks only move forward).
INSERT INTO streamsvc_schedule_ticks AS t (name, last_tick) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE
SET last_tick = greatest(t.last_tick, excluded.last_tick), updated_at = now()

-- Retention (docs/retention.md, streamsvc/actors/retention.py) ---------------------------

-- name: expire_lock_timeout
-- A retention batch waits for no one: its transaction's lock_timeout, in milliseconds.
-- Row locks are skipped (SKIP LOCKED below); this bounds the wait for the table lock,
-- which only DDL (a migration, a non-concurrent index build) would hold against it.
SELECT set_config('lock_timeout', $1::text, true)

-- name: expire
-- Delete up to $2 finished operations that finished more than $1 seconds ago by the
-- database's clock, oldest first (sql/006_retention.sql's index). Rows another
-- transaction holds are skipped, not waited for: another retention batch (several
-- sweepers take disjoint rows), or whoever changes a finished row; they go in a later batch.
-- How many were deleted.
WITH gone AS (
    DELETE FROM "BatchOperations"
    WHERE id IN (
        SELECT id FROM "BatchOperations"
        WHERE status IN ('SUCCESS', 'FAIL', 'CANCELLED')
          AND processed_at < now() - make_interval(secs => $1::float8)
        ORDER BY processed_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    RETURNING 1
)
SELECT count(*) FROM gone

-- name: announced
-- How far the outcome events are known to be on their way (sql/008_announced.sql).
SELECT before, seen FROM streamsvc_announced

-- name: mark_announced
-- Move both points forward, to $1 and $2 (never back).
INSERT INTO streamsvc_announced AS a (before, seen) VALUES ($1, $2)
ON CONFLICT (only_row) DO UPDATE
SET before = GREATEST(a.before, EXCLUDED.before), seen = GREATEST(a.seen, EXCLUDED.seen)

-- name: outcomes_since
-- The outcomes of operations that finished at or after $1 (and at or before $4, when
-- given), oldest first, after the (processed_at, id) of $1 and $2 (the last of the page
-- before); the finished rows' index on processed_at.
SELECT id::text AS id, operation_type, status, error, attempts, batch_id::text AS batch_id,
       body -> 'meta' AS meta, (body ->> 'userOperationId') AS user_operation_id, processed_at
FROM "BatchOperations"
WHERE status IN ('SUCCESS', 'FAIL', 'CANCELLED') AND processed_at >= $1
  AND (processed_at, id) > ($1, $2::uuid)
  AND ($4::timestamptz IS NULL OR processed_at <= $4)
ORDER BY processed_at, id
LIMIT $3
