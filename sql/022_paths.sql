-- Paths (pipeline/paths/): every result says which path ran it, what that path saves, and which
-- service tier answered.
--
--   path           realtime | flex | provider_batch (the batch's mode when it ran)
--   lever          the savings ledger's name for what the path saved (flex, batch, cache), or NULL
--   list_cost_usd  the same usage at list price: cost_usd is what was paid, the difference was saved
--   service_tier   the tier that answered, when the provider says: a flex request that flex
--                  refused ("resource unavailable", not billed) and standard answered says 'default'
ALTER TABLE results ADD COLUMN IF NOT EXISTS path text;
ALTER TABLE results ADD COLUMN IF NOT EXISTS lever text;
ALTER TABLE results ADD COLUMN IF NOT EXISTS list_cost_usd numeric(18, 8);
ALTER TABLE results ADD COLUMN IF NOT EXISTS service_tier text;
