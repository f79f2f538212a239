-- What a build resolved and did, for `builds show` and the API: the
-- commit its revision resolved to (set when it plans; NULL before, or for
-- a directory that is not a git checkout), the build it retries, and one
-- row per step of its spec.
ALTER TABLE builds ADD COLUMN source_commit TEXT;
ALTER TABLE builds ADD COLUMN retry_of TEXT;

CREATE TABLE build_steps (
    build_id    TEXT NOT NULL REFERENCES builds (id),
    -- The step's index in the spec.
    position    BIGINT NOT NULL,
    name        TEXT NOT NULL,
    -- The step image's manifest digest; NULL for a step on the host root.
    image       TEXT,
    -- pending | running | succeeded | failed | timed_out
    state       TEXT NOT NULL,
    -- Unix milliseconds, when the daemon heard it start.
    started_ms  BIGINT,
    -- -1 when a signal killed it; NULL until it ended (or when it timed out).
    exit_code   BIGINT,
    duration_ms BIGINT,
    PRIMARY KEY (build_id, position)
);
