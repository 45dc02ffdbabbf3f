-- Views for the questions users ask, and the read-only role `llmbatch sql` uses.
--
--   job_summary   one row per job: counts by state, cost, wall time (pipeline/stores/jobs.job_status reads it)
--   cost_daily    spend and tokens by UTC day, provider, model and tier
--   tier_latency  p50/p95 queue wait (started_at - created_at) and provider latency per tier per hour
--   rejections    stays a TABLE (001): job_id, line, custom_id, reason, created_at; no view needed
--   budget_status is defined with the budgets (sql/002_budgets.sql), not here
--
-- Every view reads only committed rows and is cheap to re-create: CREATE OR
-- REPLACE may only append columns, so new columns go at the end.

CREATE OR REPLACE VIEW job_summary AS
SELECT j.job_id, j.name, j.status, j.mode, j.simulated,
       j.lines_read, j.accepted, j.rejected,
       count(r.custom_id) FILTER (WHERE r.status = 'succeeded') AS succeeded,
       count(r.custom_id) FILTER (WHERE r.status = 'failed')    AS failed,
       count(r.custom_id) FILTER (WHERE r.status = 'cancelled') AS cancelled,
       count(r.custom_id) FILTER (WHERE r.status NOT IN ('succeeded', 'failed', 'cancelled')) AS pending,
       coalesce((SELECT sum(cost_usd) FROM results x WHERE x.job_id = j.job_id), 0) AS cost_usd,
       j.created_at, j.finished_at,
       j.finished_at - j.created_at AS wall_time,
       -- appended in 004: the states inside "pending", and the job's cap
       count(r.custom_id) FILTER (WHERE r.status = 'queued')   AS queued,
       count(r.custom_id) FILTER (WHERE r.status = 'held')     AS held,
       count(r.custom_id) FILTER (WHERE r.status = 'running')  AS running,
       count(r.custom_id) FILTER (WHERE r.status = 'deferred') AS deferred,
       j.budget_usd
FROM jobs j LEFT JOIN requests r ON r.job_id = j.job_id
GROUP BY j.job_id;

CREATE OR REPLACE VIEW cost_daily AS
SELECT date_trunc('day', x.created_at AT TIME ZONE 'UTC')::date AS day,
       q.provider, x.model, q.tier,
       count(*)                                    AS requests,
       count(*) FILTER (WHERE x.response IS NOT NULL) AS succeeded,
       coalesce(sum(x.input_tokens), 0)            AS input_tokens,
       coalesce(sum(x.cached_input_tokens), 0)     AS cached_input_tokens,
       coalesce(sum(x.output_tokens), 0)           AS output_tokens,
       sum(x.cost_usd)                             AS cost_usd
FROM results x JOIN requests q USING (job_id, custom_id)
GROUP BY 1, 2, 3, 4;

CREATE OR REPLACE VIEW tier_latency AS
SELECT date_trunc('hour', q.started_at) AS hour,
       q.tier,
       count(*) AS requests,
       round(percentile_cont(0.5) WITHIN GROUP (
           ORDER BY extract(epoch FROM q.started_at - q.created_at))::numeric, 3) AS queue_wait_p50_s,
       round(percentile_cont(0.95) WITHIN GROUP (
           ORDER BY extract(epoch FROM q.started_at - q.created_at))::numeric, 3) AS queue_wait_p95_s,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY x.latency_ms)  AS latency_p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY x.latency_ms) AS latency_p95_ms
FROM requests q LEFT JOIN results x USING (job_id, custom_id)
WHERE q.started_at IS NOT NULL
GROUP BY 1, 2;

-- The read-only role. Created by infra/stack.sh (as the superuser) or here when
-- the migrating user may create roles (docker compose: it is the superuser).
DO $$
DECLARE
    may_manage boolean := (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user);
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'llmbatch_reader') THEN
        IF may_manage THEN
            CREATE ROLE llmbatch_reader LOGIN;
        ELSE
            -- (no percent signs in migrations: the driver would read them as placeholders)
            RAISE EXCEPTION USING
                MESSAGE = 'role llmbatch_reader is missing and ' || current_user || ' may not create roles',
                HINT = 'as a superuser: CREATE ROLE llmbatch_reader LOGIN; then llmbatch db upgrade';
        END IF;
    END IF;
    EXECUTE 'GRANT CONNECT ON DATABASE ' || quote_ident(current_database()) || ' TO llmbatch_reader';
    IF may_manage THEN
        -- a second lock besides the grants (infra/stack.sh sets the same when it creates the role)
        ALTER ROLE llmbatch_reader SET default_transaction_read_only = on;
        ALTER ROLE llmbatch_reader SET statement_timeout = '60s';
    END IF;
END
$$;

-- Reads everything, writes nothing: SELECT only, on today's tables and views
-- and (default privileges) on those later migrations create; no CREATE in the schema.
GRANT USAGE ON SCHEMA public TO llmbatch_reader;
REVOKE CREATE ON SCHEMA public FROM llmbatch_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO llmbatch_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO llmbatch_reader;
