-- Budgets (issue 5). Caps set with `llmbatch budget set`, the alerts users
-- query, and the columns deferral and fallback need. Redis holds the live
-- counters; this is the durable copy they are rebuilt from.

-- Daily caps set from the command line; they override the config defaults.
CREATE TABLE budget_caps (
    scope       text PRIMARY KEY,            -- 'global' | 'tier:<tier>'
    usd         numeric(18, 8) NOT NULL CHECK (usd >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per cap crossing 80 or 100 percent (100: fully spent, or it refused a request).
CREATE TABLE budget_alerts (
    scope       text NOT NULL,               -- 'global' | 'tier:<tier>' | 'job:<job_id>'
    period      text NOT NULL,               -- 'YYYY-MM-DD' (UTC) for daily caps, 'job' for a job cap
    threshold   smallint NOT NULL,           -- 80 | 100
    cap_usd     numeric(18, 8) NOT NULL,
    spent_usd   numeric(18, 8) NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, period, threshold, cap_usd)
);

-- Why a request is deferred: 'job' | 'global' | 'tier' | 'unavailable' (budget store down).
ALTER TABLE requests ADD COLUMN deferred_scope text;
CREATE INDEX requests_deferred_idx ON requests (job_id) WHERE status = 'deferred';

-- A batch whose requests are deferred waits as status 'deferred' until
-- deferred_until (next UTC day, or soon for 'unavailable'; NULL: until a cap is raised).
ALTER TABLE batches ADD COLUMN deferred_until timestamptz;
CREATE INDEX batches_deferred_idx ON batches (deferred_until) WHERE status = 'deferred';

-- The cheaper model a job may fall back to when its model's budget or rate runs out.
ALTER TABLE jobs ADD COLUMN fallback_model text;

-- Caps and spend as SQL sees them (the ledger; live reservations are in Redis:
-- `llmbatch budget show`). Daily scopes count today (UTC); config caps not set
-- with `budget set` do not appear here.
CREATE VIEW budget_status AS
SELECT c.scope, to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS period, c.usd AS cap_usd,
       coalesce((SELECT sum(x.cost_usd) FROM results x JOIN requests q USING (job_id, custom_id)
                 WHERE x.created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                   AND (c.scope = 'global' OR c.scope = 'tier:' || q.tier)), 0) AS spent_usd,
       NULL::bigint AS deferred
FROM budget_caps c
UNION ALL
SELECT 'job:' || j.job_id, 'job', j.budget_usd,
       coalesce((SELECT sum(x.cost_usd) FROM results x WHERE x.job_id = j.job_id), 0),
       (SELECT count(*) FROM requests q WHERE q.job_id = j.job_id AND q.status = 'deferred')
FROM jobs j WHERE j.budget_usd IS NOT NULL;
