-- 0005: master-key rotation (issue 15). One row while a rotation is under
-- way: the fingerprints of the key it moves from and to (masterkey.Fingerprint,
-- never key bytes), and how far it got. Each batch re-seals and re-MACs rows
-- in key order past the cursors and advances them in the same transaction,
-- so a rotation interrupted anywhere resumes where it stopped. Until the row
-- is gone every VM and volume row opens under the old key or the new one.

CREATE TABLE master_key_rotation (
	id            INTEGER PRIMARY KEY CHECK (id = 1),
	old_key       TEXT    NOT NULL,
	new_key       TEXT    NOT NULL,
	started_ns    INTEGER NOT NULL,
	vm_cursor     TEXT    NOT NULL DEFAULT '', -- last VM name re-MAC'd
	volume_cursor TEXT    NOT NULL DEFAULT '', -- last volume ID re-sealed and re-MAC'd
	vms           INTEGER NOT NULL DEFAULT 0,  -- rows done so far
	volumes       INTEGER NOT NULL DEFAULT 0
) STRICT;
