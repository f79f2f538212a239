-- A build whose spec is read from its source at the resolved commit has
-- no spec bytes when it is queued (`spec` stays empty); 0 for a spec that
-- came with the request.
ALTER TABLE builds ADD COLUMN spec_in_source INTEGER NOT NULL DEFAULT 0;
