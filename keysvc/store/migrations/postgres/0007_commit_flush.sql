-- 0007: commit_flush, one row per server backend that ends an audit batch.
-- The batch commits with synchronous_commit off, so that the audit head's
-- lock is released without waiting for the disk; the writer then updates
-- its backend's row here in a transaction of its own, with synchronous
-- commit, which waits until the WAL (the batch's commit record included)
-- is flushed, and on a synchronous standby, before any append is answered.

CREATE TABLE commit_flush (
	pid integer PRIMARY KEY,
	n   bigint NOT NULL DEFAULT 0
);
