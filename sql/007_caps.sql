-- Caps that cannot leak (issue 13). Caps in force live in budget_caps only
-- (set with `llmbatch budget set`, or `llmbatch budget apply-config` from the
-- settings); Redis mirrors them. A request a cap holds back says why, in words.
ALTER TABLE requests ADD COLUMN IF NOT EXISTS deferred_reason text;

-- A job cap is a finite amount, 0 or more (NULL: no cap); -1 used to mean "no cap" by accident.
UPDATE jobs SET budget_usd = 0 WHERE budget_usd < 0;
ALTER TABLE jobs ADD CONSTRAINT jobs_budget_usd_check CHECK (budget_usd IS NULL OR budget_usd >= 0);
