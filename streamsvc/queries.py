"""Every statement the service runs on its own tables, in one place."""

from __future__ import annotations

OPS = '"BatchOperations"'

INSERT_OPERATIONS = f"""
INSERT INTO {OPS} (id, operation_type, body, priority, run_at, ordering_key, source, submitted_by)
SELECT u.id, u.operation_type, u.body::jsonb, u.priority, u.run_at, u.ordering_key,
       u.source, u.submitted_by
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int2[], $5::timestamptz[], $6::text[],
            $7::text[], $8::text[])
     AS u(id, operation_type, body, priority, run_at, ordering_key, source, submitted_by)
ON CONFLICT (id) DO NOTHING
RETURNING id::text
"""

STATUS_OF = f"""
SELECT id::text, operation_type, status FROM {OPS} WHERE id = ANY($1::uuid[])
"""

# A batch transaction's bookkeeping and statements (sql/batch.sql, which the connections
# of a flushing process create, says how): claim the batch's pending rows, marking them
# SUCCESS; mark the refused ones FAIL.
CLAIM_BATCH = "SELECT op_id, attempts FROM pg_temp.streamsvc_claim($1::uuid[], $2::uuid)"
MARK_FAILED = "SELECT pg_temp.streamsvc_mark_failed($1::uuid[], $2::text[])"

STATE_OF = f"""
SELECT id::text, status, error, attempts, batch_id::text FROM {OPS} WHERE id = ANY($1::uuid[])
"""

# Batches writing the same table apply one after the other (sql/apply_rows.sql, which the
# connections of a flushing process create, says how): `tables` sorted.
LOCK_TABLES = "SELECT pg_temp.streamsvc_lock_tables($1::text[])"

# A batch's statements, their refused rows searched out inside PostgreSQL, in one round
# trip (sql/apply_rows.sql, sql/batch.sql): the table locks first (an empty list when taken
# already), then each statement over its rows (a JSON array in text), as the caller role:
# a multi-row statement over all its rows, or (each: true) a caller's statement once per
# row, a row holding its parameters. The rows a statement accepts are applied; each
# refused one returns with its statement's index, its position, SQLSTATE and message. A
# batch's first call also claims its rows (claim ids, else NULL) and stops when any had
# finished; its last call also marks the refused FAIL (each statement's operation ids,
# comma-separated, else NULL; and the ids and errors refused earlier in the batch).
# Arguments: claim ids, batch id, tables, statements, rows, each, mark ids, failed ids,
# failed errors.
APPLY_BATCH = """
SELECT op_id, attempts, group_index, row_position, error_state, error_message
FROM pg_temp.streamsvc_apply_batch($1::uuid[], $2::uuid, $3::text[], $4::text[], $5::text[],
                                   $6::boolean[], $7::text[], $8::uuid[], $9::text[])
"""

# After a batch that ran callers' statements: what they may have left on the session for
# the next user of the connection (settings changed with set_config(..., false), session
# advisory locks, a statement prepared for them that a timeout left behind). RESET ALL
# returns every setting to the connection's start-up value.
CLEAN_SESSION = "RESET ALL; SELECT pg_advisory_unlock_all(), pg_temp.streamsvc_forget_statement()"

# Count a transient failure on rows still pending; they stay in the stream for a retry.
COUNT_ATTEMPT = f"""
UPDATE {OPS} SET status = 'PROCESSING', attempts = attempts + 1, error = $2, updated_at = now()
WHERE id = ANY($1::uuid[]) AND status IN ('UNPROCESSED', 'PROCESSING')
"""

# Mark pending rows as just enqueued again (keeps the sweeper's staleness rule true).
TOUCH_PENDING = f"""
UPDATE {OPS} SET updated_at = now()
WHERE id = ANY($1::uuid[]) AND status IN ('UNPROCESSED', 'PROCESSING')
"""

# End rows still pending as FAIL (retries exhausted, or dead-lettered).
FAIL_PENDING = f"""
UPDATE {OPS} SET status = 'FAIL', error = $2, processed_at = clock_timestamp(), updated_at = now()
WHERE id = ANY($1::uuid[]) AND status IN ('UNPROCESSED', 'PROCESSING')
RETURNING id::text, operation_type, attempts, body -> 'meta'
"""

# Pending rows untouched since before $1: touch them and hand them back for re-enqueueing.
CLAIM_STALE = f"""
UPDATE {OPS} SET updated_at = now()
WHERE id IN (
    SELECT id FROM {OPS}
    WHERE status IN ('UNPROCESSED', 'PROCESSING') AND updated_at < $1
    ORDER BY updated_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
RETURNING id::text, body::text
"""

# One operation by its id or its caller's userOperationId, seen by $2 (NULL: by anyone);
# an id match first, then the looker's own ($3), then the oldest.
GET_OPERATION = f"""
SELECT id::text AS id, operation_type, status, error, attempts, priority, source,
       batch_id::text AS batch_id, run_at, ordering_key, created_at, updated_at, processed_at,
       body::text AS body
FROM {OPS}
WHERE (id = $1::uuid OR user_operation_id = $1::uuid)
  AND ($2::text IS NULL OR submitted_by = $2::text)
ORDER BY id = $1::uuid DESC, submitted_by = $3::text DESC, created_at
LIMIT 1
"""

STATUS_COUNTS = f"SELECT status, count(*) FROM {OPS} GROUP BY status"

RECENT_FAILURES = f"""
SELECT id::text, operation_type, error, processed_at FROM {OPS}
WHERE status = 'FAIL' ORDER BY processed_at DESC NULLS LAST LIMIT $1
"""

FINISHED_SINCE = f"""
SELECT count(*) FROM {OPS}
WHERE processed_at >= now() - make_interval(secs => $1) AND status IN ('SUCCESS', 'FAIL')
"""
