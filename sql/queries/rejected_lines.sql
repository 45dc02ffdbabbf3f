-- Which input lines were rejected at submit, and why? (the latest 50, newest job first)
-- `rejections` is a table: job_id, line, custom_id, reason, created_at.
-- llmbatch sql -f sql/queries/rejected_lines.sql
SELECT r.job_id, j.name AS job_name, r.line, r.custom_id, r.reason
FROM rejections r JOIN jobs j USING (job_id)
ORDER BY r.created_at DESC, r.line
LIMIT 50;
