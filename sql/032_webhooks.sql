-- Webhooks of `llmbatch api` (pipeline/api/webhooks.py), opt-in per project: a project that
-- registered a URL gets one signed POST (Standard Webhooks headers, OpenAI's batch event shape)
-- when each of its batches ends, retried with backoff until it is answered 2xx.
--
-- The secret signs the events, so it is kept as it is (not hashed) and the reader role cannot
-- read it.
CREATE TABLE IF NOT EXISTS api_webhooks (
    project_id  text PRIMARY KEY REFERENCES api_projects,
    url         text NOT NULL,
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON api_webhooks FROM llmbatch_reader;

-- One event per batch end (batch_id UNIQUE): made by the trigger below in the transaction that
-- ends the batch, so no path that ends a batch can miss it or make two.
CREATE TABLE IF NOT EXISTS api_webhook_events (
    event_id         text PRIMARY KEY,
    project_id       text NOT NULL REFERENCES api_projects,
    batch_id         text NOT NULL UNIQUE REFERENCES api_batches,
    type             text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    -- retried too long (or the project removed its webhook): no more attempts
    gave_up_at       timestamptz
);
CREATE INDEX IF NOT EXISTS api_webhook_events_due ON api_webhook_events (next_attempt_at)
    WHERE delivered_at IS NULL AND gave_up_at IS NULL;

-- Every delivery attempt and how it went: the receiver's status code, or the error that kept it
-- from answering.
CREATE TABLE IF NOT EXISTS api_webhook_attempts (
    event_id     text NOT NULL REFERENCES api_webhook_events,
    attempt      integer NOT NULL,
    url          text NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    status_code  integer,
    error        text,
    ms           integer NOT NULL,
    PRIMARY KEY (event_id, attempt)
);

-- A batch ends when one of its end stamps is first set (each is set once, when the batch enters
-- that status: pipeline/api/batches.py); its project's webhook, if any, gets the event.
CREATE OR REPLACE FUNCTION api_batch_ended_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO api_webhook_events (event_id, project_id, batch_id, type)
    SELECT 'evt_' || replace(gen_random_uuid()::text, '-', ''), NEW.project_id, NEW.batch_id,
           CASE WHEN NEW.completed_at IS NOT NULL THEN 'batch.completed'
                WHEN NEW.failed_at IS NOT NULL THEN 'batch.failed'
                WHEN NEW.expired_at IS NOT NULL THEN 'batch.expired'
                ELSE 'batch.cancelled' END
    WHERE EXISTS (SELECT 1 FROM api_webhooks w WHERE w.project_id = NEW.project_id)
    ON CONFLICT (batch_id) DO NOTHING;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS api_batch_ended_event ON api_batches;
CREATE TRIGGER api_batch_ended_event AFTER UPDATE ON api_batches
    FOR EACH ROW WHEN (num_nonnulls(NEW.completed_at, NEW.failed_at, NEW.expired_at, NEW.cancelled_at)
                       > num_nonnulls(OLD.completed_at, OLD.failed_at, OLD.expired_at, OLD.cancelled_at))
    EXECUTE FUNCTION api_batch_ended_event();
