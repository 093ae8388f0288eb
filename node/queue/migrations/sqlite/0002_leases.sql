-- Who holds a job (a node id) and until when (Unix time): claims take received jobs and expired leases.
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_until REAL NOT NULL DEFAULT 0;
