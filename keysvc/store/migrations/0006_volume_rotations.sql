-- 0006: unwrap-key rotation (issue 15). A volume with a row here has a
-- second, pending UK: the key service releases both until the VM proves it
-- holds the pending one (its image then opens with it alone), and then, in
-- one transaction, makes the pending UK the volume's and deletes this row.
-- The pending UK is sealed under the master key like volumes.sealed_uk, with
-- its own additional data (keysvc: rotate.go), so it cannot be taken for the
-- current one.

CREATE TABLE volume_rotations (
	volume     TEXT    PRIMARY KEY REFERENCES volumes (id),
	sealed_uk  BLOB    NOT NULL,
	started_ns INTEGER NOT NULL
) STRICT;

-- Crypto-erase destroys both keys: erasing a volume (its sealed_uk set to
-- NULL) deletes its pending UK in the same transaction, whoever erases it.
CREATE TRIGGER volume_rotations_erase AFTER UPDATE OF sealed_uk ON volumes
WHEN NEW.sealed_uk IS NULL
BEGIN DELETE FROM volume_rotations WHERE volume = NEW.id; END;
