-- Lines the producer counted as accepted that never became requests: the batcher
-- refused their messages (to llm.requests.dlq, with the reason in headers) or they
-- never arrived. Without this count such a job waited for them for ever; the
-- scheduler's upkeep (schedules/upkeep.py close_short_jobs) sets it once a job has
-- been quiet long enough, and the job then ends with its outcome.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS refused integer NOT NULL DEFAULT 0;

CREATE OR REPLACE VIEW job_summary AS
SELECT j.job_id, j.name, j.status, j.mode, j.simulated,
       j.lines_read, j.accepted, j.rejected,
       count(r.custom_id) FILTER (WHERE r.status = 'succeeded') AS succeeded,
       count(r.custom_id) FILTER (WHERE r.status = 'failed')    AS failed,
       count(r.custom_id) FILTER (WHERE r.status = 'cancelled') AS cancelled,
       count(r.custom_id) FILTER (WHERE r.status NOT IN ('succeeded', 'failed', 'cancelled')) AS pending,
       coalesce((SELECT sum(cost_usd) FROM results x WHERE x.job_id = j.job_id), 0) AS cost_usd,
       j.created_at, j.finished_at,
       j.finished_at - j.created_at AS wall_time,
       count(r.custom_id) FILTER (WHERE r.status = 'queued')   AS queued,
       count(r.custom_id) FILTER (WHERE r.status = 'held')     AS held,
       count(r.custom_id) FILTER (WHERE r.status = 'running')  AS running,
       count(r.custom_id) FILTER (WHERE r.status = 'deferred') AS deferred,
       j.budget_usd,
       -- appended in 011
       j.refused
FROM jobs j LEFT JOIN requests r ON r.job_id = j.job_id
GROUP BY j.job_id;
