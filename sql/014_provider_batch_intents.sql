-- Provider batches that cannot double-bill (issue 25). A provider batch row in 'creating' is the
-- intent, recorded before anything is sent; each attempt to create it at the provider is counted
-- and timed, so that after a crash the scheduler looks for the batch the attempt may have made
-- (OpenAI: the batch's metadata names the row; Anthropic: the request count and the creation
-- window, then the custom_ids once results exist) and sends again only when the provider has none.
ALTER TABLE provider_batches ADD COLUMN IF NOT EXISTS create_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE provider_batches ADD COLUMN IF NOT EXISTS first_create_at timestamptz;    -- the window opens
ALTER TABLE provider_batches ADD COLUMN IF NOT EXISTS create_started_at timestamptz;  -- the last attempt
-- A cancel is a state the scheduler carries out (cancel_requested, from 003), whatever the row's
-- status, until the provider confirms it.
ALTER TABLE provider_batches ADD COLUMN IF NOT EXISTS cancel_requested_at timestamptz;
ALTER TABLE provider_batches ADD COLUMN IF NOT EXISTS cancel_confirmed_at timestamptz;
CREATE INDEX IF NOT EXISTS provider_batches_cancel_idx ON provider_batches (status)
    WHERE cancel_requested AND cancel_confirmed_at IS NULL;
