-- The first hour (issue 15).
--
-- 1. A submit records its progress and process on its job, so a submit that
--    died (killed, machine gone) is found and closed by the scheduler's upkeep
--    (schedules/upkeep.py close_abandoned_submits) instead of staying
--    'submitting' for good, and an interrupted submit can be resumed from the
--    line after the last one it handled (`llmbatch submit FILE --resume JOB`).
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS submit_progress_at timestamptz;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS submit_pid integer;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS submit_host text;
-- the last line number the submit handled (read and published or rejected)
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS submit_line integer;
CREATE INDEX IF NOT EXISTS jobs_submitting_idx ON jobs (submit_progress_at) WHERE status = 'submitting';

-- 2. tier_latency: answers from the response cache never waited for a worker or
--    a provider (0 ms), so they are left out of every percentile and counted in
--    a column of their own. `requests` now counts requests a worker executed.
CREATE OR REPLACE VIEW tier_latency AS
SELECT date_trunc('hour', q.started_at) AS hour,
       q.tier,
       count(*) FILTER (WHERE NOT coalesce(x.from_cache, false)) AS requests,
       round(percentile_cont(0.5) WITHIN GROUP (
           ORDER BY extract(epoch FROM q.started_at - q.created_at))
           FILTER (WHERE NOT coalesce(x.from_cache, false))::numeric, 3) AS queue_wait_p50_s,
       round(percentile_cont(0.95) WITHIN GROUP (
           ORDER BY extract(epoch FROM q.started_at - q.created_at))
           FILTER (WHERE NOT coalesce(x.from_cache, false))::numeric, 3) AS queue_wait_p95_s,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY x.latency_ms)
           FILTER (WHERE NOT coalesce(x.from_cache, false)) AS latency_p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY x.latency_ms)
           FILTER (WHERE NOT coalesce(x.from_cache, false)) AS latency_p95_ms,
       count(*) FILTER (WHERE x.from_cache) AS cache_hits
FROM requests q LEFT JOIN results x USING (job_id, custom_id)
WHERE q.started_at IS NOT NULL
GROUP BY 1, 2;
