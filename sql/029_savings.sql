-- The savings ledger (pipeline/money/savings.py): for every result, what each lever saved of its
-- list price (the same usage, realtime, no cache: results.list_cost_usd, migration 022).
--
--   savings    {"lever": "usd", ...}: cache, coalesce, batch, flex, prompt_cache, price_window;
--              the values add up to list_cost_usd - cost_usd (a prompt cache's writes can make its
--              part negative); levers that did not apply are absent
--   saved_usd  (migration 005, until now only on cache hits) list_cost_usd - cost_usd on every result
--   lever      the lever that saved the most (cache and coalesce: answered without a call)
--
-- Rows written before this migration get the savings their columns can tell.
ALTER TABLE results ADD COLUMN IF NOT EXISTS savings jsonb;

UPDATE results
   SET savings = jsonb_build_object('cache', saved_usd::text),
       list_cost_usd = coalesce(list_cost_usd, saved_usd),
       lever = coalesce(lever, 'cache')
 WHERE from_cache AND savings IS NULL;
UPDATE results
   SET savings = CASE WHEN lever IS NOT NULL AND list_cost_usd > cost_usd
                      THEN jsonb_build_object(lever, (list_cost_usd - cost_usd)::text) ELSE '{}'::jsonb END,
       saved_usd = list_cost_usd - cost_usd
 WHERE NOT from_cache AND savings IS NULL AND list_cost_usd IS NOT NULL;

-- One row per UTC day: spent against list price, and what each lever saved.
CREATE OR REPLACE VIEW savings_daily AS
SELECT date_trunc('day', x.created_at AT TIME ZONE 'UTC')::date AS day,
       count(*)                                                   AS requests,
       count(*) FILTER (WHERE x.from_cache)                       AS answered_without_call,
       sum(coalesce(x.list_cost_usd, x.cost_usd))                 AS list_cost_usd,
       sum(x.cost_usd)                                            AS cost_usd,
       sum(coalesce(x.list_cost_usd, x.cost_usd) - x.cost_usd)    AS saved_usd,
       coalesce(sum((x.savings->>'cache')::numeric), 0)           AS saved_cache_usd,
       coalesce(sum((x.savings->>'coalesce')::numeric), 0)        AS saved_coalesce_usd,
       coalesce(sum((x.savings->>'batch')::numeric), 0)           AS saved_batch_usd,
       coalesce(sum((x.savings->>'flex')::numeric), 0)            AS saved_flex_usd,
       coalesce(sum((x.savings->>'prompt_cache')::numeric), 0)    AS saved_prompt_cache_usd,
       coalesce(sum((x.savings->>'price_window')::numeric), 0)    AS saved_price_window_usd
FROM results x
GROUP BY 1;

GRANT SELECT ON savings_daily TO llmbatch_reader;
