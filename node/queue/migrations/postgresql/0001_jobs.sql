-- One row per received SOP Instance (node.queue.JobState). Times are Unix seconds; leases and stamps use the
-- database server's clock, so nodes on several hosts agree on when a lease expires.
CREATE TABLE jobs (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sop_instance_uid    TEXT NOT NULL UNIQUE,
    sop_class_uid       TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    calling_ae          TEXT NOT NULL,
    called_ae           TEXT NOT NULL,
    peer_address        TEXT NOT NULL,
    spool_path          TEXT,
    state               TEXT NOT NULL CHECK (state IN
                            ('received', 'inferring', 'writing', 'sending', 'done', 'skipped', 'failed', 'dead')),
    error               TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    received_at         DOUBLE PRECISION NOT NULL,
    updated_at          DOUBLE PRECISION NOT NULL,
    next_attempt_at     DOUBLE PRECISION NOT NULL DEFAULT 0,
    results             JSONB NOT NULL DEFAULT '[]',
    delivered           JSONB NOT NULL DEFAULT '[]',
    timings             JSONB NOT NULL DEFAULT '{}',
    accession_number    TEXT NOT NULL DEFAULT '',
    study_date          TEXT NOT NULL DEFAULT '',
    finding             JSONB,
    model_version       TEXT,
    owner               TEXT,
    lease_until         DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE INDEX jobs_state ON jobs (state, next_attempt_at, id);
-- What a worker's claim scans: received jobs, and held ones whose lease may have expired.
CREATE INDEX jobs_to_infer ON jobs (id) WHERE state IN ('received', 'inferring', 'writing');
