-- Deadlines kept or reported (issue 24, item 4).
--
-- The scheduler releases a held request at its latest start (deadline minus
-- the setting deadline_margin_s) and fails one still held at its deadline
-- with error code 'deadline_missed' (schedules/deadlines.py). Both look for
-- open requests by deadline: the partial index keeps that off finished rows.
-- Two new views (no existing view is redefined):
--   request_deadlines  one row per request with a deadline, and how it went;
--   job_deadlines      the same counted per job.
-- deadline_outcome:
--   missed     not started by its deadline: failed 'deadline_missed', never sent
--   late       finished (succeeded or failed) after its deadline
--   on_time    finished by its deadline
--   overdue    still open (held, queued, running, deferred) past its deadline
--   pending    still open, deadline ahead
--   cancelled  its job was cancelled

CREATE INDEX IF NOT EXISTS requests_deadline_open_idx ON requests (deadline)
    WHERE deadline IS NOT NULL AND status NOT IN ('succeeded', 'failed', 'cancelled');

CREATE VIEW request_deadlines AS
SELECT r.job_id, r.custom_id, r.line, r.tier, r.tier_reason, r.status, r.deadline,
       r.started_at, r.finished_at,
       CASE WHEN x.error ->> 'code' = 'deadline_missed' THEN 'missed'
            WHEN r.status = 'cancelled' THEN 'cancelled'
            WHEN r.status IN ('succeeded', 'failed') AND r.finished_at > r.deadline THEN 'late'
            WHEN r.status IN ('succeeded', 'failed') THEN 'on_time'
            WHEN now() > r.deadline THEN 'overdue'
            ELSE 'pending' END AS deadline_outcome,
       CASE WHEN r.finished_at IS NOT NULL THEN r.finished_at - r.deadline END AS finished_after_deadline
FROM requests r LEFT JOIN results x ON x.job_id = r.job_id AND x.custom_id = r.custom_id
WHERE r.deadline IS NOT NULL;

CREATE VIEW job_deadlines AS
SELECT job_id,
       count(*) AS with_deadline,
       count(*) FILTER (WHERE deadline_outcome = 'on_time') AS on_time,
       count(*) FILTER (WHERE deadline_outcome = 'late') AS late,
       count(*) FILTER (WHERE deadline_outcome = 'missed') AS missed,
       count(*) FILTER (WHERE deadline_outcome = 'overdue') AS overdue,
       count(*) FILTER (WHERE deadline_outcome = 'pending') AS pending,
       min(deadline) FILTER (WHERE deadline_outcome IN ('pending', 'overdue')) AS next_deadline
FROM request_deadlines
GROUP BY job_id;
