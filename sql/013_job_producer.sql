-- Who may add requests to a job: the Kafka user (producer) that made it. The batcher
-- checks every message's signature (pipeline/intake/kafka.py) and refuses, to the DLQ, a
-- message for a job another producer owns, or one that is finished or cancelled
-- (pipeline/stores/batches.py admit_requests). Jobs made before this migration were made by the
-- pipeline's own producer (llmbatch submit, or publish_request with the stack's key).
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS producer text;
UPDATE jobs SET producer = 'llmbatch-submit' WHERE producer IS NULL;
