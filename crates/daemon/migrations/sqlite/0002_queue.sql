-- The durable queue: which daemon holds a build, until when, and whether
-- its runner may have started (a build whose runner never started can be
-- handed to another daemon; one whose runner started cannot).
ALTER TABLE builds ADD COLUMN owner TEXT;
-- Unix milliseconds; the owner renews it while the build runs.
ALTER TABLE builds ADD COLUMN lease_until INTEGER;
ALTER TABLE builds ADD COLUMN runner_started INTEGER NOT NULL DEFAULT 0;
-- How many times a daemon claimed it (1 for a build that ran once).
ALTER TABLE builds ADD COLUMN claims INTEGER NOT NULL DEFAULT 0;
-- Set when someone asks a running build to stop; its owner acts on it.
ALTER TABLE builds ADD COLUMN cancel_reason TEXT;

CREATE INDEX builds_queue ON builds (state, id);
