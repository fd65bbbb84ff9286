-- Callers' API keys, stored only as HMAC-SHA256 under API_KEY_ENCRYPTION_SECRET.
CREATE TABLE streamsvc_api_keys (
    name       text PRIMARY KEY,
    key_hash   bytea       NOT NULL UNIQUE,
    tables     text[],                    -- NULL: every allowed table
    actions    text[]      NOT NULL,
    allow_sql  boolean     NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
