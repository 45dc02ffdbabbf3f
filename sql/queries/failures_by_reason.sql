-- Why did requests fail (last 7 days)? One row per error code and HTTP status, with a sample message.
-- llmbatch sql -f sql/queries/failures_by_reason.sql
SELECT x.error ->> 'code' AS code, x.status_code, count(*) AS requests,
       min(x.error ->> 'message') AS sample_message
FROM results x
WHERE x.error IS NOT NULL AND x.created_at >= now() - interval '7 days'
GROUP BY 1, 2
ORDER BY requests DESC;
