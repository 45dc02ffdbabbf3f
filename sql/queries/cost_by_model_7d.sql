-- What did each model cost, per tier, over the last 7 days (UTC), most expensive first?
-- llmbatch sql -f sql/queries/cost_by_model_7d.sql
SELECT provider, model, tier,
       sum(requests)      AS requests,
       sum(input_tokens)  AS input_tokens,
       sum(output_tokens) AS output_tokens,
       sum(cost_usd)      AS cost_usd
FROM cost_daily
WHERE day >= current_date - 7
GROUP BY provider, model, tier
ORDER BY cost_usd DESC;
