-- Anthropic Message Batches on `llmbatch api` (pipeline/api/message_batches.py). Such a batch is
-- an api_batches row like an OpenAI batch (its job, status and stage times), with endpoint
-- '/v1/messages' and an id 'msgbatch_…'; its requests are written to disk as an input file of
-- purpose 'message_batch', which the OpenAI files routes do not show.
--
-- request_total: how many requests the create call held (Anthropic counts them all `processing`
-- until the batch ends); result_counts: {succeeded, errored, canceled, expired}, written with the
-- results file once the batch has ended; deleted_at: the batch was deleted (only once ended).
ALTER TABLE api_batches ADD COLUMN IF NOT EXISTS request_total integer;
ALTER TABLE api_batches ADD COLUMN IF NOT EXISTS result_counts jsonb;
ALTER TABLE api_batches ADD COLUMN IF NOT EXISTS deleted_at timestamptz;
