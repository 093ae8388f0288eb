-- The job table as it was before schema versions (a file from then has user_version 0 and may lack the columns
-- added by later releases: node.queue.sqlite adds them).
CREATE TABLE IF NOT EXISTS jobs (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid    TEXT NOT NULL UNIQUE,
    sop_class_uid       TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    calling_ae          TEXT NOT NULL,
    called_ae           TEXT NOT NULL,
    peer_address        TEXT NOT NULL,
    spool_path          TEXT,
    state               TEXT NOT NULL,
    error               TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    received_at         REAL NOT NULL,
    updated_at          REAL NOT NULL,
    next_attempt_at     REAL NOT NULL DEFAULT 0,
    results             TEXT NOT NULL DEFAULT '[]',
    delivered           TEXT NOT NULL DEFAULT '[]',
    timings             TEXT NOT NULL DEFAULT '{}',
    accession_number    TEXT NOT NULL DEFAULT '',
    study_date          TEXT NOT NULL DEFAULT '',
    finding             TEXT,
    model_version       TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, next_attempt_at, id);
