-- The scheduler (issue 6): provider Batch API bookkeeping, recurring schedules
-- and their runs, retention markers, and the test clock.

-- A batch is either run by our workers (realtime) or sent to a provider Batch
-- API (provider_batch). Provider-batch batches are written 'held' by the
-- batcher and become 'submitted' once inside a provider batch.
--   batches.status: held | queued | dispatched | running | submitted | done
ALTER TABLE batches ADD COLUMN mode text NOT NULL DEFAULT 'realtime';   -- realtime | provider_batch
ALTER TABLE batches ADD COLUMN provider_batch text;                     -- provider_batches.id
CREATE INDEX batches_held_idx ON batches (tier, mode, created_at) WHERE status = 'held';

-- What happens to a provider-batch request the provider did not run
-- (expired, cancelled by the provider, batch failed validation):
-- 'realtime' re-queues it through our workers, 'fail' marks it failed.
ALTER TABLE jobs ADD COLUMN batch_fallback text NOT NULL DEFAULT 'realtime';
ALTER TABLE jobs ADD COLUMN schedule_name text;
ALTER TABLE jobs ADD COLUMN cancelled_at timestamptz;

-- Bodies purged by retention: costs, counts and token numbers stay.
ALTER TABLE requests ADD COLUMN purged_at timestamptz;
ALTER TABLE results ADD COLUMN purged_at timestamptz;

-- One row per batch created at a provider. Several of our batches (same
-- provider and model) may go into one; a large set is split within the
-- provider's limits (requests and bytes).
CREATE TABLE provider_batches (
    id                  text PRIMARY KEY,                 -- ours: pb_…
    provider            text NOT NULL,
    model               text NOT NULL,
    status              text NOT NULL,
        -- creating | submitted | ended | abandoned
    provider_batch_id   text,                             -- batch_… / msgbatch_…
    input_file_id       text,                             -- OpenAI only
    provider_status     text,
    requests            integer NOT NULL,
    bytes               bigint NOT NULL,
    cancel_requested    boolean NOT NULL DEFAULT false,
    error               text,
    counts              jsonb,                            -- what ingestion found
    created_at          timestamptz NOT NULL DEFAULT now(),
    submitted_at        timestamptz,
    polled_at           timestamptz,
    ended_at            timestamptz
);
CREATE INDEX provider_batches_open_idx ON provider_batches (status) WHERE status IN ('creating', 'submitted');

-- Recurring JSONL runs. The cron is evaluated by the scheduler; every run is a job.
CREATE TABLE schedules (
    name            text PRIMARY KEY,
    cron            text NOT NULL,          -- 5 fields, or 6 with seconds first
    timezone        text NOT NULL DEFAULT 'UTC',
    file            text NOT NULL,
    tier            text,
    priority        smallint,
    budget_usd      numeric(18, 8),
    mode            text NOT NULL DEFAULT 'realtime',
    overlap         text NOT NULL DEFAULT 'skip',       -- skip | queue
    enabled         boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- One row per cron slot: the unique key makes a slot fire at most once, across
-- restarts and across two schedulers.
CREATE TABLE schedule_runs (
    schedule_name   text NOT NULL REFERENCES schedules (name) ON DELETE CASCADE,
    scheduled_for   timestamptz NOT NULL,
    status          text NOT NULL,
        -- submitting | submitted | skipped | queued | missed | failed
    job_id          text,
    manual          boolean NOT NULL DEFAULT false,
    detail          text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    PRIMARY KEY (schedule_name, scheduled_for)
);
CREATE INDEX jobs_schedule_idx ON jobs (schedule_name) WHERE schedule_name IS NOT NULL;

-- The injectable clock (schedules/clock.py): with LLMBATCH_CLOCK=db every
-- process reads "now" from here, so a test moves time for all of them at once.
CREATE TABLE sched_clock (
    id          smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    frozen_at   timestamptz,                            -- when set, now() is this
    offset_s    double precision NOT NULL DEFAULT 0     -- else real time + offset
);
