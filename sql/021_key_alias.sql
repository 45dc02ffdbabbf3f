-- Which key of its provider a call went out on, by alias (never the key itself):
-- per attempt, and on the result the one of the attempt that answered.
ALTER TABLE results ADD COLUMN IF NOT EXISTS key_alias text;
ALTER TABLE attempts ADD COLUMN IF NOT EXISTS key_alias text;
