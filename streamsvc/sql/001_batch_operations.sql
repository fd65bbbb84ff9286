-- The record of every operation the service accepted, and what became of it.
CREATE TABLE "BatchOperations" (
    id             uuid PRIMARY KEY,
    operation_type text        NOT NULL,
    body           jsonb       NOT NULL,
    status         text        NOT NULL DEFAULT 'UNPROCESSED'
                   CHECK (status IN ('UNPROCESSED', 'PROCESSING', 'SUCCESS', 'FAIL')),
    error          text,
    attempts       integer     NOT NULL DEFAULT 0,
    priority       smallint    NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9),
    run_at         timestamptz,
    ordering_key   text,
    source         text        NOT NULL,
    submitted_by   text        NOT NULL,
    batch_id       uuid,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    processed_at   timestamptz
);

-- The sweeper looks for pending rows nobody has touched for a while.
CREATE INDEX "BatchOperations_pending_idx" ON "BatchOperations" (updated_at)
    WHERE status IN ('UNPROCESSED', 'PROCESSING');

-- Which operations went together in one transaction.
CREATE INDEX "BatchOperations_batch_idx" ON "BatchOperations" (batch_id)
    WHERE batch_id IS NOT NULL;

-- Recent failures, newest first, for `streamsvc status`.
CREATE INDEX "BatchOperations_failed_idx" ON "BatchOperations" (processed_at DESC)
    WHERE status = 'FAIL';
