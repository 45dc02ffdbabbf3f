-- States have one definition: pipeline/constants.py. The views, partial indexes and CHECKs that
-- spelled lists of states now read them from llmbatch_states(name), the function db.upgrade
-- generates from constants.py STATE_SETS and installs before any migration, on every upgrade
-- (pipeline/stores/db.py install_states; when a set changes it rebuilds what was computed from it:
-- these indexes, and the CHECK against every row).
--
-- The function is IMMUTABLE: Postgres folds llmbatch_states('request_terminal') into its array
-- when it plans, so `status <> ALL(llmbatch_states('request_terminal'))` is the old NOT IN list
-- to the planner, and the queries (pipeline/stores/*.py, schedules/*.py), which say the same,
-- still match these partial indexes. The views keep their columns; only the lists change.

CREATE OR REPLACE VIEW job_summary AS
SELECT j.job_id, j.name, j.status, j.mode, j.simulated,
       j.lines_read, j.accepted, j.rejected,
       count(r.custom_id) FILTER (WHERE r.status = 'succeeded') AS succeeded,
       count(r.custom_id) FILTER (WHERE r.status = 'failed')    AS failed,
       count(r.custom_id) FILTER (WHERE r.status = 'cancelled') AS cancelled,
       count(r.custom_id) FILTER (WHERE r.status <> ALL(llmbatch_states('request_terminal'))) AS pending,
       coalesce((SELECT sum(cost_usd) FROM results x WHERE x.job_id = j.job_id), 0) AS cost_usd,
       j.created_at, j.finished_at,
       j.finished_at - j.created_at AS wall_time,
       count(r.custom_id) FILTER (WHERE r.status = 'queued')   AS queued,
       count(r.custom_id) FILTER (WHERE r.status = 'held')     AS held,
       count(r.custom_id) FILTER (WHERE r.status = 'running')  AS running,
       count(r.custom_id) FILTER (WHERE r.status = 'deferred') AS deferred,
       j.budget_usd,
       j.refused
FROM jobs j LEFT JOIN requests r ON r.job_id = j.job_id
GROUP BY j.job_id;

-- job_deadlines reads this view; its columns are unchanged
CREATE OR REPLACE VIEW request_deadlines AS
SELECT r.job_id, r.custom_id, r.line, r.tier, r.tier_reason, r.status, r.deadline,
       r.started_at, r.finished_at,
       CASE WHEN x.error ->> 'code' = 'deadline_missed' THEN 'missed'
            WHEN r.status = 'cancelled' THEN 'cancelled'
            WHEN r.status = ANY(llmbatch_states('request_answered')) AND r.finished_at > r.deadline THEN 'late'
            WHEN r.status = ANY(llmbatch_states('request_answered')) THEN 'on_time'
            WHEN now() > r.deadline THEN 'overdue'
            ELSE 'pending' END AS deadline_outcome,
       CASE WHEN r.finished_at IS NOT NULL THEN r.finished_at - r.deadline END AS finished_after_deadline
FROM requests r LEFT JOIN results x ON x.job_id = r.job_id AND x.custom_id = r.custom_id
WHERE r.deadline IS NOT NULL;

-- A job's unfinished requests (refresh_jobs, cancel_job), and open requests by deadline (the
-- scheduler's deadlines): the partial indexes keep both off finished rows.
DROP INDEX IF EXISTS requests_open_idx;
CREATE INDEX requests_open_idx ON requests (job_id)
    WHERE status <> ALL(llmbatch_states('request_terminal'));
DROP INDEX IF EXISTS requests_deadline_open_idx;
CREATE INDEX requests_deadline_open_idx ON requests (deadline)
    WHERE deadline IS NOT NULL AND status <> ALL(llmbatch_states('request_terminal'));
DROP INDEX IF EXISTS provider_batches_open_idx;
CREATE INDEX provider_batches_open_idx ON provider_batches (status)
    WHERE status = ANY(llmbatch_states('provider_batch_open'));

ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_status_check,
    ADD CONSTRAINT jobs_status_check CHECK (status = ANY(llmbatch_states('job_states')));
