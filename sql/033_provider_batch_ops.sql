-- Provider batches as an operator runs them (schedules/pb_queue.py, issue 21 item 2):
--
--   provider_batches.input_tokens       prompt tokens of its lines (the pipeline's count): what it
--                                       takes of the provider's batch queue per model while open
--   provider_batches.results_expire_at  when the provider deletes its results (Anthropic: 29 days
--                                       after creation; OpenAI: output_expires_after after the output
--                                       file's creation, so creation + that is a lower bound)
--   provider_batches.results_copied_at  when its result lines were copied into provider_batch_results
--                                       (before the ingest reads them; the ingest deletes the copy)
--   requests.batch_resubmits            times the request went into a new provider batch because one
--                                       did not run it (expired, a retryable error)
ALTER TABLE provider_batches ADD COLUMN IF NOT EXISTS input_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE provider_batches ADD COLUMN IF NOT EXISTS results_expire_at timestamptz;
ALTER TABLE provider_batches ADD COLUMN IF NOT EXISTS results_copied_at timestamptz;
ALTER TABLE requests ADD COLUMN IF NOT EXISTS batch_resubmits integer NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS provider_batch_results (
    provider_batch  text NOT NULL REFERENCES provider_batches (id) ON DELETE CASCADE,
    seq             integer NOT NULL,
    line            jsonb NOT NULL,
    PRIMARY KEY (provider_batch, seq)
);

CREATE INDEX IF NOT EXISTS provider_batches_model_open_idx ON provider_batches (provider, model)
    WHERE status = ANY(llmbatch_states('provider_batch_open'));
