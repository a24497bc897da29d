-- 0002: master-key rotation, as SQLite's 0005: one row while a rotation is
-- under way, with the fingerprints of the old and new keys (never key bytes)
-- and the cursors up to which rows are re-keyed. RekeyBatch and
-- FinishMasterKeyRotation lock this row (SELECT … FOR UPDATE), so that two
-- replicas never re-key the same batch.

CREATE TABLE master_key_rotation (
	id            integer PRIMARY KEY CHECK (id = 1),
	old_key       text    NOT NULL,
	new_key       text    NOT NULL,
	started_ns    bigint  NOT NULL,
	vm_cursor     text    NOT NULL DEFAULT '', -- last VM name re-MAC'd
	volume_cursor text    NOT NULL DEFAULT '', -- last volume ID re-sealed and re-MAC'd
	vms           bigint  NOT NULL DEFAULT 0,  -- rows done so far
	volumes       bigint  NOT NULL DEFAULT 0
);
