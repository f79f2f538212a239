-- Builds, what they pushed, their logs and their provenance.
CREATE TABLE builds (
    id          TEXT PRIMARY KEY,
    -- queued | running | succeeded | failed | cancelled
    state       TEXT NOT NULL,
    spec_path   TEXT NOT NULL,
    spec        BLOB NOT NULL,
    -- JSON: {"git": URL, "revision": REV} or {"directory": PATH}
    source      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    started_at  TEXT,
    finished_at TEXT,
    error       TEXT,
    -- The DSSE envelope, only for a build whose every push and check passed.
    provenance  BLOB
);

CREATE INDEX builds_by_state ON builds (state, created_at);

CREATE TABLE build_outputs (
    build_id  TEXT NOT NULL REFERENCES builds (id),
    position  INTEGER NOT NULL,
    reference TEXT NOT NULL,
    digest    TEXT NOT NULL,
    size      INTEGER NOT NULL,
    PRIMARY KEY (build_id, position)
);

CREATE TABLE log_lines (
    build_id    TEXT NOT NULL REFERENCES builds (id),
    seq         INTEGER NOT NULL,
    step        INTEGER NOT NULL,
    -- 0 stdout, 1 stderr
    stream      INTEGER NOT NULL,
    line        BLOB NOT NULL,
    unix_millis INTEGER NOT NULL,
    PRIMARY KEY (build_id, seq)
);
