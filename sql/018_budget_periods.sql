-- One period per spend, one clock for the caps (issue 25 item 4), and provider-batch holds that
-- end with their batch (item 3).
--
-- A spend belongs to the budget period of its reservation: the Redis counters always counted it
-- there, and now the ledger says so too (results.budget_period), so the views and every rebuild
-- count it in the same day. A provider batch reserved on day D and ingested on D+1 is D's spend.
--
-- The caps' clock is budget_now(): the sched_clock row when a test set it (setting clock = "db",
-- pipeline/clock.py), else real time. Production never has the row, so it is now().

CREATE OR REPLACE FUNCTION budget_now() RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT coalesce(frozen_at, now() + make_interval(secs => offset_s))
                     FROM sched_clock WHERE id = 1), now())
$$;

CREATE OR REPLACE FUNCTION budget_day() RETURNS date LANGUAGE sql STABLE AS $$
    SELECT (budget_now() AT TIME ZONE 'UTC')::date
$$;

-- the UTC day of the reservation a result's cost was counted under (a row written without one:
-- the caps' clock at the write)
ALTER TABLE results ADD COLUMN IF NOT EXISTS budget_period date;
UPDATE results SET budget_period = (created_at AT TIME ZONE 'UTC')::date WHERE budget_period IS NULL;
ALTER TABLE results ALTER COLUMN budget_period SET DEFAULT budget_day();
ALTER TABLE results ALTER COLUMN budget_period SET NOT NULL;
CREATE INDEX IF NOT EXISTS results_budget_period_idx ON results (budget_period);

-- the period a provider batch's hold on this request was taken in (schedules/pb_submit.py):
-- its result is written into it, and a rebuild re-holds it there
ALTER TABLE requests ADD COLUMN IF NOT EXISTS budget_period date;

-- a provider batch whose holds are not settled yet: ingestion commits settle_xid (its
-- transaction id, for the counters' "already counted?" check) with settled_at NULL, and the
-- scheduler settles until it can set settled_at, whatever stopped the first try
ALTER TABLE provider_batches ADD COLUMN IF NOT EXISTS settle_xid text;
ALTER TABLE provider_batches ADD COLUMN IF NOT EXISTS settled_at timestamptz;
UPDATE provider_batches SET settled_at = ended_at WHERE status = 'ended' AND settled_at IS NULL;
CREATE INDEX IF NOT EXISTS provider_batches_unsettled_idx ON provider_batches (id)
    WHERE status = 'ended' AND settled_at IS NULL;

-- Caps and spend as SQL sees them: today by the caps' clock, spend by its budget period.
CREATE OR REPLACE VIEW budget_status AS
SELECT c.scope, to_char(budget_day(), 'YYYY-MM-DD') AS period, c.usd AS cap_usd,
       coalesce((SELECT sum(x.cost_usd) FROM results x JOIN requests q USING (job_id, custom_id)
                 WHERE x.budget_period = budget_day()
                   AND (c.scope = 'global' OR c.scope = 'tier:' || q.tier)), 0) AS spent_usd,
       NULL::bigint AS deferred
FROM budget_caps c
UNION ALL
SELECT 'job:' || j.job_id, 'job', j.budget_usd,
       coalesce((SELECT sum(x.cost_usd) FROM results x WHERE x.job_id = j.job_id), 0),
       (SELECT count(*) FROM requests q WHERE q.job_id = j.job_id AND q.status = 'deferred')
FROM jobs j WHERE j.budget_usd IS NOT NULL;
