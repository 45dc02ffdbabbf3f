-- Provider calls that may have been billed (issue 24 #1).
--
-- A worker writes a row here before it sends a call ('sent'), in the transaction
-- that also asks whether the job was cancelled (workers/gate.py Gate), so a
-- call is durable before it can be billed. An answer removes the row (its cost is
-- in results). A call that went out and got no answer (a timeout, a dropped
-- connection, a worker killed mid-call) becomes 'unconfirmed': spend at the
-- call's maximum cost, counted against every cap by the ledger (pipeline/money/ledger.py
-- ledger_snapshot) for good, until a provider report names it ('confirmed', with
-- the cost it reports). A dead worker's 'sent' rows are made 'unconfirmed' by whoever
-- takes its batch back, or by the budget reconcile once they are stale.
CREATE TABLE provider_calls (
    call_id       text PRIMARY KEY,
    hold_id       text NOT NULL,          -- the budget hold the call was sent under (Redis)
    job_id        text NOT NULL,
    custom_id     text NOT NULL,
    tier          text NOT NULL,
    batch_id      text,
    owner         text,                   -- the batch lease holder that sent it
    max_cost_usd  numeric(18, 8) NOT NULL,
    state         text NOT NULL DEFAULT 'sent' CHECK (state IN ('sent', 'unconfirmed', 'confirmed')),
    reason        text,
    confirmed_usd numeric(18, 8),
    created_at    timestamptz NOT NULL DEFAULT now(),
    resolved_at   timestamptz
);
CREATE INDEX provider_calls_sent_idx ON provider_calls (batch_id) WHERE state = 'sent';
CREATE INDEX provider_calls_unconfirmed_idx ON provider_calls (job_id) WHERE state = 'unconfirmed';

-- Spend the provider may have billed and nobody has confirmed, per job, tier and UTC day.
CREATE VIEW unconfirmed_spend AS
SELECT job_id, tier, (created_at AT TIME ZONE 'UTC')::date AS day,
       count(*) AS calls, sum(max_cost_usd) AS unconfirmed_usd
FROM provider_calls WHERE state = 'unconfirmed'
GROUP BY job_id, tier, (created_at AT TIME ZONE 'UTC')::date;

-- Confirmed (results) and unconfirmed spend apart, per cap scope: what the caps count is their sum.
CREATE VIEW budget_spend AS
WITH today AS (SELECT date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS start)
SELECT c.scope, to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS period, c.usd AS cap_usd,
       coalesce((SELECT sum(x.cost_usd) FROM results x JOIN requests q USING (job_id, custom_id), today
                 WHERE x.created_at >= today.start
                   AND (c.scope = 'global' OR c.scope = 'tier:' || q.tier)), 0) AS confirmed_usd,
       coalesce((SELECT sum(p.max_cost_usd) FROM provider_calls p, today
                 WHERE p.state = 'unconfirmed' AND p.created_at >= today.start
                   AND (c.scope = 'global' OR c.scope = 'tier:' || p.tier)), 0) AS unconfirmed_usd
FROM budget_caps c
UNION ALL
SELECT 'job:' || j.job_id, 'job', j.budget_usd,
       coalesce((SELECT sum(x.cost_usd) FROM results x WHERE x.job_id = j.job_id), 0),
       coalesce((SELECT sum(p.max_cost_usd) FROM provider_calls p
                 WHERE p.job_id = j.job_id AND p.state = 'unconfirmed'), 0)
FROM jobs j WHERE j.budget_usd IS NOT NULL;
