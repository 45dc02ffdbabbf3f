-- A call that may have been billed counts in a budget period, like every other spend.
--
-- 012 counted unconfirmed calls by the UTC day of created_at; 018 made a spend belong to the
-- period of its reservation, on the caps' one clock (budget_day()). A call is written just after
-- its reservation, so the caps' clock at the write is its period: the ledger, the views and every
-- rebuild count it on the same day.
ALTER TABLE provider_calls ADD COLUMN IF NOT EXISTS budget_period date;
UPDATE provider_calls SET budget_period = (created_at AT TIME ZONE 'UTC')::date WHERE budget_period IS NULL;
ALTER TABLE provider_calls ALTER COLUMN budget_period SET DEFAULT budget_day();
ALTER TABLE provider_calls ALTER COLUMN budget_period SET NOT NULL;

CREATE OR REPLACE VIEW unconfirmed_spend AS
SELECT job_id, tier, budget_period AS day, count(*) AS calls, sum(max_cost_usd) AS unconfirmed_usd
FROM provider_calls WHERE state = 'unconfirmed'
GROUP BY job_id, tier, budget_period;

-- Confirmed (results) and unconfirmed spend apart, per cap scope, today by the caps' clock.
CREATE OR REPLACE VIEW budget_spend AS
SELECT c.scope, to_char(budget_day(), 'YYYY-MM-DD') AS period, c.usd AS cap_usd,
       coalesce((SELECT sum(x.cost_usd) FROM results x JOIN requests q USING (job_id, custom_id)
                 WHERE x.budget_period = budget_day()
                   AND (c.scope = 'global' OR c.scope = 'tier:' || q.tier)), 0) AS confirmed_usd,
       coalesce((SELECT sum(p.max_cost_usd) FROM provider_calls p
                 WHERE p.state = 'unconfirmed' AND p.budget_period = budget_day()
                   AND (c.scope = 'global' OR c.scope = 'tier:' || p.tier)), 0) AS unconfirmed_usd
FROM budget_caps c
UNION ALL
SELECT 'job:' || j.job_id, 'job', j.budget_usd,
       coalesce((SELECT sum(x.cost_usd) FROM results x WHERE x.job_id = j.job_id), 0),
       coalesce((SELECT sum(p.max_cost_usd) FROM provider_calls p
                 WHERE p.job_id = j.job_id AND p.state = 'unconfirmed'), 0)
FROM jobs j WHERE j.budget_usd IS NOT NULL;
