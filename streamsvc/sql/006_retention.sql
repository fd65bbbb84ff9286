-- Retention (docs/retention.md): finished operations, oldest finished first, so that each
-- small delete batch finds its rows at the start of this index instead of reading past the
-- pending rows or through the whole table. It also serves `finished_since` (status).
-- "BatchOperations_failed_idx" stays: the latest failures, newest first, would otherwise
-- be found by walking back past every newer SUCCESS in this index.
-- On a large table, create this index CONCURRENTLY before upgrading (the statement below,
-- with CONCURRENTLY); the migration then finds it and takes no lock that blocks writes.
CREATE INDEX IF NOT EXISTS "BatchOperations_finished_idx" ON "BatchOperations" (processed_at)
    WHERE status IN ('SUCCESS', 'FAIL', 'CANCELLED');
