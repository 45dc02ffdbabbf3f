-- Response cache: which requests may be answered from it, and what a hit saved.
ALTER TABLE requests ADD COLUMN cache_key text;
ALTER TABLE results ADD COLUMN from_cache boolean NOT NULL DEFAULT false;
ALTER TABLE results ADD COLUMN saved_usd numeric(18, 8) NOT NULL DEFAULT 0;
