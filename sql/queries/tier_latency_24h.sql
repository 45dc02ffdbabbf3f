-- How long did requests wait in each tier before a worker started them, and how fast
-- did the provider answer, hour by hour over the last 24 hours?
-- llmbatch sql -f sql/queries/tier_latency_24h.sql
SELECT hour, tier, requests, queue_wait_p50_s, queue_wait_p95_s, latency_p50_ms, latency_p95_ms
FROM tier_latency
WHERE hour >= now() - interval '24 hours'
ORDER BY hour DESC, tier;
