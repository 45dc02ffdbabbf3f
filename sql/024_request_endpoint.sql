-- Every request names its endpoint: the url it is sent to, realtime or in a provider batch
-- (pipeline/endpoints/). Rows written before endpoints existed were chat completions, or
-- Anthropic messages when their provider was anthropic.
ALTER TABLE requests ADD COLUMN IF NOT EXISTS endpoint text NOT NULL DEFAULT '/v1/chat/completions';
UPDATE requests SET endpoint = '/v1/messages' WHERE provider = 'anthropic' AND endpoint <> '/v1/messages';
ALTER TABLE requests ALTER COLUMN endpoint DROP DEFAULT;

-- A writer that names no endpoint (one from before it existed) gets its provider's chat url,
-- which is what such a writer meant; the batcher always names it.
CREATE OR REPLACE FUNCTION requests_endpoint_default() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.endpoint IS NULL THEN
        NEW.endpoint := CASE WHEN NEW.provider = 'anthropic' THEN '/v1/messages' ELSE '/v1/chat/completions' END;
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS requests_endpoint_default ON requests;
CREATE TRIGGER requests_endpoint_default BEFORE INSERT ON requests
    FOR EACH ROW WHEN (NEW.endpoint IS NULL) EXECUTE FUNCTION requests_endpoint_default();
