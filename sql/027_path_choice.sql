-- The cost engine's choice (issue 21, item 1): every request says which path it was given and why.
--
--   requests.path_reason  why the request takes its path: under --mode auto the chooser's words
--                         (pipeline/paths/chooser.py: the path, its share of the dearest quote, when it
--                         is expected, the deadline it meets, the cheaper paths that would miss it);
--                         otherwise "the job's mode ...". A fallback appends what moved it.
--
-- Two new views (no existing view is redefined):
--   request_paths  one row per request: the path it was given (its batch's mode) and why, the path
--                  that answered (results.path), its lever, what it cost and its list price;
--   job_paths      the same counted per job and path, with one reason of each.
ALTER TABLE requests ADD COLUMN IF NOT EXISTS path_reason text;

CREATE VIEW request_paths AS
SELECT r.job_id, r.custom_id, r.tier, r.status, b.mode AS path, r.path_reason, r.deadline,
       x.path AS answered_by, x.lever, x.cost_usd, x.list_cost_usd, r.finished_at
FROM requests r
LEFT JOIN batches b ON b.batch_id = r.batch_id
LEFT JOIN results x ON x.job_id = r.job_id AND x.custom_id = r.custom_id;

CREATE VIEW job_paths AS
SELECT job_id, path,
       count(*) AS requests,
       count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
       coalesce(sum(cost_usd), 0) AS cost_usd,
       coalesce(sum(list_cost_usd), 0) AS list_cost_usd,
       min(path_reason) AS a_reason
FROM request_paths
GROUP BY job_id, path;
