-- The PostgreSQL object store (node.store.postgresql): received objects, result objects and pictures by key
-- (node.store keys: spool/ab/UID.dcm, results/STUDY/seg-UID.dcm, thumbnails/ID.png). A received object is inserted
-- in the transaction that inserts its job. Stored out of line without compression: DICOM pixel data rarely
-- compresses enough to pay for the CPU.
CREATE TABLE objects (
    key        TEXT PRIMARY KEY,
    data       BYTEA NOT NULL,
    stored_at  DOUBLE PRECISION NOT NULL
);
ALTER TABLE objects ALTER COLUMN data SET STORAGE EXTERNAL;
