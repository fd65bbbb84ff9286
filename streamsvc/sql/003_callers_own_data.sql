-- A key sees only its own operations unless it is an admin, and may submit at most
-- rate_limit_ops operations per second (NULL: STREAMSVC_RATE_LIMIT_OPS; 0: no limit).
ALTER TABLE streamsvc_api_keys
    ADD COLUMN admin          boolean NOT NULL DEFAULT false,
    ADD COLUMN rate_limit_ops integer CHECK (rate_limit_ops >= 0);

-- The caller's own id, kept apart from the stored id: a keyed caller's operation is stored
-- under an id derived from its key's name and this userOperationId (so idempotency is per
-- key), and is looked up by either. Generated from the stored body, so no writer can set it
-- apart from the operation it came with.
ALTER TABLE "BatchOperations"
    ADD COLUMN user_operation_id uuid
        GENERATED ALWAYS AS ((body ->> 'userOperationId')::uuid) STORED;

CREATE INDEX "BatchOperations_user_operation_idx" ON "BatchOperations" (user_operation_id)
    WHERE user_operation_id IS NOT NULL;
