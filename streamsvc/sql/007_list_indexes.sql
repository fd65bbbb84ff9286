-- Lists and counts of operations (docs/queries.md shows the plans these make).
--
-- A list page is newest first, (created_at, id) descending, after a cursor. Each shape of
-- list (a caller's own or everyone's; by operationType or not) has an index whose leading
-- columns are its equality filters, then status, then (created_at, id): the list reads one
-- backward range per status and merges them (streamsvc/store/listing.py), so a page reads
-- about `limit` index entries however deep it is and however rare its filters. With
-- status before created_at, the same index serves a status filter as one range, and the
-- counts of a time window as an index-only scan of five ranges.
--
-- Every index is written again on every status change (those updates change updated_at,
-- which an index holds, so none of them is HOT): the set is kept to one index per shape.
-- docs/queries.md has their cost on intake and flushing. IF NOT EXISTS: on a large table an
-- operator may build them first with CREATE INDEX CONCURRENTLY under these names, rather than
-- have the migration's transaction hold writes while it builds them.

-- Everyone's (an admin's list): all, or by status; counts of everyone's.
CREATE INDEX IF NOT EXISTS "BatchOperations_list_idx"
    ON "BatchOperations" (status, created_at, id) INCLUDE (operation_type);

-- A caller's own: all, or by status; counts of a caller's own.
CREATE INDEX IF NOT EXISTS "BatchOperations_caller_list_idx"
    ON "BatchOperations" (submitted_by, status, created_at, id) INCLUDE (operation_type);

-- Everyone's of one operationType, all or by status.
CREATE INDEX IF NOT EXISTS "BatchOperations_type_list_idx"
    ON "BatchOperations" (operation_type, status, created_at, id);

-- A caller's own of one operationType, all or by status.
CREATE INDEX IF NOT EXISTS "BatchOperations_caller_type_list_idx"
    ON "BatchOperations" (submitted_by, operation_type, status, created_at, id);

-- Operations finished per minute (store.throughput) read 006's finished-rows index.
