-- The nodes sharing the queue: what each runs (roles, comma-separated), where, since when, and its last heartbeat.
CREATE TABLE nodes (
    node_id    TEXT PRIMARY KEY,
    roles      TEXT NOT NULL,
    host       TEXT NOT NULL,
    started_at REAL NOT NULL,
    last_seen  REAL NOT NULL
);
