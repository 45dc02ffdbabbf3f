-- Job outcomes and crash counting (issue 12, items 7 and 8).
--
-- A job is 'completed' only when every request succeeded; otherwise it ends
-- 'completed_with_errors' (some failed or were cancelled) or 'failed' (none
-- succeeded). pipeline/stores/jobs.py refresh_jobs decides; pipeline/constants.py
-- JOB_STATES and JOB_TERMINAL list the same states.
--
-- batches.crashes counts the deliveries whose previous holder neither finished,
-- deferred nor gave the batch back: a worker that died, lost its lease or whose
-- batch raised. Budget resumes and clean re-dispatches are not crashes
-- (batches.deliveries still counts every claim). last_failure is the reason a
-- person reads when the batch is failed as poison.

ALTER TABLE batches ADD COLUMN IF NOT EXISTS crashes integer NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN IF NOT EXISTS last_failure text;

-- Jobs finished before this migration were 'completed' whatever their requests did.
UPDATE jobs j SET status = CASE
        WHEN NOT EXISTS (SELECT 1 FROM requests r WHERE r.job_id = j.job_id AND r.status = 'succeeded')
            THEN 'failed'
        ELSE 'completed_with_errors' END
WHERE j.status = 'completed'
  AND EXISTS (SELECT 1 FROM requests r WHERE r.job_id = j.job_id AND r.status IN ('failed', 'cancelled'));

ALTER TABLE jobs ADD CONSTRAINT jobs_status_check CHECK (status IN (
    'submitting', 'running', 'paused_budget',
    'completed', 'completed_with_errors', 'failed', 'cancelled'));
