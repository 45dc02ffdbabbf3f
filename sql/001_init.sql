-- llmbatch schema, first migration. Postgres is the system of record:
-- every request, batch, attempt, result and dollar is here. Money is NUMERIC.

CREATE TABLE jobs (
    job_id          text PRIMARY KEY,
    name            text,
    status          text NOT NULL DEFAULT 'submitting',
        -- submitting | running | completed | failed | cancelled | paused_budget
    source          text,
    mode            text NOT NULL DEFAULT 'realtime',   -- realtime | provider_batch
    priority        smallint,
    tier            text,
    budget_usd      numeric(18, 8),
    on_budget       text NOT NULL DEFAULT 'defer',      -- defer | fail
    lines_read      integer NOT NULL DEFAULT 0,
    accepted        integer NOT NULL DEFAULT 0,
    rejected        integer NOT NULL DEFAULT 0,
    simulated       boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now(),
    submitted_at    timestamptz,
    finished_at     timestamptz
);

-- Lines of a job that never became requests, with the reason a person reads.
CREATE TABLE rejections (
    job_id      text NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    line        integer NOT NULL,
    custom_id   text,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, line)
);

CREATE TABLE batches (
    batch_id        text PRIMARY KEY,
    tier            text NOT NULL,
    provider        text NOT NULL,
    model           text NOT NULL,
    size            integer NOT NULL,
    status          text NOT NULL,
        -- held | queued | dispatched | running | done
    lease_owner     text,
    lease_until     timestamptz,
    deliveries      integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    dispatched_at   timestamptz,
    started_at      timestamptz,
    finished_at     timestamptz
);
CREATE INDEX batches_status_idx ON batches (status, created_at);

-- One row per (job, custom_id): the natural key that makes replays harmless.
CREATE TABLE requests (
    job_id          text NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    custom_id       text NOT NULL,
    line            integer,
    batch_id        text REFERENCES batches (batch_id) DEFERRABLE INITIALLY DEFERRED,
    provider        text NOT NULL,
    model           text NOT NULL,
    tier            text NOT NULL,
    tier_reason     text NOT NULL,
    priority        smallint NOT NULL,
    deadline        timestamptz,
    body            jsonb,
    metadata        jsonb,
    input_tokens    integer NOT NULL,
    tokens_exact    boolean NOT NULL DEFAULT true,
    max_cost_usd    numeric(18, 8) NOT NULL,
    status          text NOT NULL,
        -- queued | held | running | deferred | succeeded | failed | cancelled
    attempts        smallint NOT NULL DEFAULT 0,
    published_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    PRIMARY KEY (job_id, custom_id)
);
CREATE INDEX requests_batch_idx ON requests (batch_id);
CREATE INDEX requests_job_status_idx ON requests (job_id, status);
-- Finding a job's unfinished requests must not scan its finished ones.
CREATE INDEX requests_open_idx ON requests (job_id)
    WHERE status NOT IN ('succeeded', 'failed', 'cancelled');

-- The answer (or final error) of a request: at most one row per request.
CREATE TABLE results (
    job_id              text NOT NULL,
    custom_id           text NOT NULL,
    model               text NOT NULL,
    status_code         integer,
    response            jsonb,
    error               jsonb,
    input_tokens        integer,
    cached_input_tokens integer,
    output_tokens       integer,
    usage_missing       boolean NOT NULL DEFAULT false,
    cost_usd            numeric(18, 8) NOT NULL DEFAULT 0,
    provider_request_id text,
    latency_ms          integer,
    created_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, custom_id),
    FOREIGN KEY (job_id, custom_id) REFERENCES requests (job_id, custom_id) ON DELETE CASCADE
);

-- Every provider call, retried or not: what the provider said and when.
CREATE TABLE attempts (
    job_id              text NOT NULL,
    custom_id           text NOT NULL,
    attempt             smallint NOT NULL,
    status_code         integer,
    error               text,
    latency_ms          integer,
    provider_request_id text,
    cost_usd            numeric(18, 8) NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, custom_id, attempt)
);

CREATE VIEW job_summary AS
SELECT j.job_id, j.name, j.status, j.mode, j.simulated,
       j.lines_read, j.accepted, j.rejected,
       count(r.custom_id) FILTER (WHERE r.status = 'succeeded') AS succeeded,
       count(r.custom_id) FILTER (WHERE r.status = 'failed')    AS failed,
       count(r.custom_id) FILTER (WHERE r.status = 'cancelled') AS cancelled,
       count(r.custom_id) FILTER (WHERE r.status NOT IN ('succeeded', 'failed', 'cancelled')) AS pending,
       coalesce((SELECT sum(cost_usd) FROM results x WHERE x.job_id = j.job_id), 0) AS cost_usd,
       j.created_at, j.finished_at,
       j.finished_at - j.created_at AS wall_time
FROM jobs j LEFT JOIN requests r ON r.job_id = j.job_id
GROUP BY j.job_id;
