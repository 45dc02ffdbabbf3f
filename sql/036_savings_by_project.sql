-- The savings ledger per API project and UTC day (the jobs page, pipeline/api/web.py): what a
-- project's jobs spent against list price, and what each lever saved. project_id is NULL for jobs
-- submitted outside the API. savings_daily (029) becomes its sum over projects, so the ledger's
-- arithmetic is written once.
CREATE OR REPLACE VIEW savings_daily_project AS
SELECT date_trunc('day', x.created_at AT TIME ZONE 'UTC')::date AS day,
       j.project_id,
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
FROM results x JOIN jobs j USING (job_id)
GROUP BY 1, 2;

CREATE OR REPLACE VIEW savings_daily AS
SELECT day,
       sum(requests)::bigint              AS requests,
       sum(answered_without_call)::bigint AS answered_without_call,
       sum(list_cost_usd)                 AS list_cost_usd,
       sum(cost_usd)                      AS cost_usd,
       sum(saved_usd)                     AS saved_usd,
       sum(saved_cache_usd)               AS saved_cache_usd,
       sum(saved_coalesce_usd)            AS saved_coalesce_usd,
       sum(saved_batch_usd)               AS saved_batch_usd,
       sum(saved_flex_usd)                AS saved_flex_usd,
       sum(saved_prompt_cache_usd)        AS saved_prompt_cache_usd,
       sum(saved_price_window_usd)        AS saved_price_window_usd
FROM savings_daily_project
GROUP BY 1;

GRANT SELECT ON savings_daily_project TO llmbatch_reader;
