-- Retention of ended jobs' rows (pipeline/stores/retention.py, `llmbatch purge`): the requests,
-- results, attempts, embeddings, rejections, answered provider calls and emptied batches of jobs
-- that ended more than purge_jobs_after_days ago are deleted, so Postgres stops growing with
-- the work done. The job's own row stays, with what the deleted rows added up to.
--
--   rows_purged_at  when its rows were deleted (NULL: they are all there)
--   purged_totals   {"succeeded", "failed", "cancelled", "cost_usd", "list_cost_usd"}, counted
--                   before the first row went, so a purge stopped halfway keeps the whole figures
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS rows_purged_at timestamptz;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS purged_totals jsonb;

-- the ended jobs not yet purged, oldest first
CREATE INDEX IF NOT EXISTS jobs_unpurged_finished_idx ON jobs (finished_at) WHERE rows_purged_at IS NULL;
