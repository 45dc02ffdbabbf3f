-- Where are my last ten jobs: how many requests are done, pending or failed, and what did they cost?
-- llmbatch sql -f sql/queries/recent_jobs.sql
SELECT job_id, name, status, accepted, succeeded, failed, pending, held, deferred,
       cost_usd, budget_usd, wall_time
FROM job_summary
ORDER BY created_at DESC
LIMIT 10;
