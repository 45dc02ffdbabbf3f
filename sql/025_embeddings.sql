-- Embedding vectors as real[], one row per input item, written with the result that carried them
-- (pipeline/stores/embeddings.py). The result's JSON answer keeps everything else, with
-- "embedding": null in each data item: the vector is here, once, at 4 bytes a dimension.
CREATE TABLE IF NOT EXISTS embeddings (
    job_id      text NOT NULL,
    custom_id   text NOT NULL,
    idx         integer NOT NULL,      -- the item's "index" in the answer's data
    vector      real[] NOT NULL,
    PRIMARY KEY (job_id, custom_id, idx),
    FOREIGN KEY (job_id, custom_id) REFERENCES results (job_id, custom_id) ON DELETE CASCADE
);
-- the reader role sees it like every table (sql/004_views.sql default privileges)
GRANT SELECT ON embeddings TO llmbatch_reader;
