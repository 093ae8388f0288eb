-- The nodes sharing the queue: what each runs (roles), where, since when, and its last heartbeat (Unix seconds,
-- the server's clock). For the status page and /metrics; nothing depends on it for correctness (leases do that).
CREATE TABLE nodes (
    node_id    TEXT PRIMARY KEY,
    roles      TEXT NOT NULL,
    host       TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    last_seen  DOUBLE PRECISION NOT NULL
);
