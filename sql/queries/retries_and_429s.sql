-- How often did providers push back? Attempts per HTTP status over the last 24 hours
-- (429 = rate limited, 5xx/529 = provider trouble; attempt > 1 = a retry).
-- llmbatch sql -f sql/queries/retries_and_429s.sql
SELECT coalesce(status_code::text, 'no answer') AS status_code,
       count(*)                                AS attempts,
       count(*) FILTER (WHERE attempt > 1)     AS retries,
       round(avg(latency_ms))                  AS avg_latency_ms
FROM attempts
WHERE created_at >= now() - interval '24 hours'
GROUP BY 1
ORDER BY attempts DESC;
