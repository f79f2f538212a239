-- Builds, what they pushed, their logs and their provenance. The same
-- schema as migrations/sqlite, in PostgreSQL's types.
CREATE TABLE builds (
    id          TEXT PRIMARY KEY,
    -- queued | running | succeeded | failed | cancelled
    state       TEXT NOT NULL,
    spec_path   TEXT NOT NULL,
    spec        BYTEA NOT NULL,
    -- JSON: {"git": URL, "revision": REV} or {"directory": PATH}
    source      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    started_at  TEXT,
    finished_at TEXT,
    error       TEXT,
    -- The DSSE envelope, only for a build whose every push and check passed.
    provenance  BYTEA
);

CREATE INDEX builds_by_state ON builds (state, created_at);

CREATE TABLE build_outputs (
    build_id  TEXT NOT NULL REFERENCES builds (id),
    position  BIGINT NOT NULL,
    reference TEXT NOT NULL,
    digest    TEXT NOT NULL,
    size      BIGINT NOT NULL,
    PRIMARY KEY (build_id, position)
);

CREATE TABLE log_lines (
    build_id    TEXT NOT NULL REFERENCES builds (id),
    seq         BIGINT NOT NULL,
    step        BIGINT NOT NULL,
    -- 0 stdout, 1 stderr
    stream      BIGINT NOT NULL,
    line        BYTEA NOT NULL,
    unix_millis BIGINT NOT NULL,
    PRIMARY KEY (build_id, seq)
);
