-- The HTTP front door (`llmbatch api`, pipeline/api/): projects, their API keys, uploaded and
-- written files, and OpenAI batch objects, each an llmbatch job.
--
-- A key is stored as the sha256 of the key (api_keys.key_sha256), never the key: a key is 32
-- random bytes, so a fast hash is enough (nothing to guess by brute force, unlike a password),
-- and a lookup is one index probe. The reader role does not see the hashes.
CREATE TABLE IF NOT EXISTS api_projects (
    project_id  text PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS api_keys (
    key_id      text PRIMARY KEY,
    project_id  text NOT NULL REFERENCES api_projects,
    key_sha256  bytea NOT NULL UNIQUE,
    -- the key's first characters, to tell keys apart in `llmbatch keys list`
    hint        text NOT NULL,
    name        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
REVOKE ALL ON api_keys FROM llmbatch_reader;

-- purpose 'batch' (uploaded), 'batch_output' (written by the service: output and error files)
CREATE TABLE IF NOT EXISTS api_files (
    file_id     text PRIMARY KEY,
    project_id  text NOT NULL REFERENCES api_projects,
    purpose     text NOT NULL,
    filename    text NOT NULL,
    bytes       bigint NOT NULL,
    path        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    deleted_at  timestamptz
);
CREATE INDEX IF NOT EXISTS api_files_project ON api_files (project_id, created_at);

-- One OpenAI batch: its llmbatch job, its status and the time it entered each stage.
CREATE TABLE IF NOT EXISTS api_batches (
    batch_id          text PRIMARY KEY,
    project_id        text NOT NULL REFERENCES api_projects,
    job_id            text NOT NULL UNIQUE,
    input_file_id     text NOT NULL,
    endpoint          text NOT NULL,
    completion_window text NOT NULL,
    metadata          jsonb,
    status            text NOT NULL DEFAULT 'validating',
    output_expires_s  integer,
    output_file_id    text,
    error_file_id     text,
    -- why a batch failed validation as a whole (its lines' reasons are the job's rejections)
    failure           text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    in_progress_at    timestamptz,
    finalizing_at     timestamptz,
    completed_at      timestamptz,
    failed_at         timestamptz,
    expired_at        timestamptz,
    cancelling_at     timestamptz,
    cancelled_at      timestamptz
);
-- the list call: a project's batches, newest first, paged by id
CREATE INDEX IF NOT EXISTS api_batches_project ON api_batches (project_id, created_at DESC, batch_id DESC);

-- The project a job belongs to (NULL: submitted outside the API): its spend counts against the
-- project's daily cap, budget_caps scope 'project:<id>' (pipeline/money/caps.py).
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS project_id text;
CREATE INDEX IF NOT EXISTS jobs_project ON jobs (project_id) WHERE project_id IS NOT NULL;
