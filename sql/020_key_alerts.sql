-- A provider key that answered 401 or 403 left the rotation (pipeline/providers/keys.py):
-- one row per revocation, written by the worker that saw it first. Only the key's alias
-- (a non-secret name from the providers' configuration) is kept, never the key.
CREATE TABLE IF NOT EXISTS key_alerts (
    id          bigserial PRIMARY KEY,
    provider    text NOT NULL,
    key_alias   text NOT NULL,
    status_code int,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS key_alerts_key_idx ON key_alerts (provider, key_alias, created_at);
