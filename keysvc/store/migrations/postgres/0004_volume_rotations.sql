-- 0004: unwrap-key rotation, as SQLite's 0006: a volume with a row here
-- has a second, pending UK, sealed under the master key with its own
-- additional data, until the VM proves it holds it.

CREATE TABLE volume_rotations (
	volume     text   PRIMARY KEY REFERENCES volumes (id),
	sealed_uk  bytea  NOT NULL,
	started_ns bigint NOT NULL
);

-- Crypto-erase destroys both keys: erasing a volume (its sealed_uk set to
-- NULL) deletes its pending UK in the same transaction, whoever erases it.
CREATE FUNCTION volume_rotations_erase() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN DELETE FROM volume_rotations WHERE volume = NEW.id; RETURN NULL; END $$;
CREATE TRIGGER volume_rotations_erase AFTER UPDATE OF sealed_uk ON volumes
	FOR EACH ROW WHEN (NEW.sealed_uk IS NULL) EXECUTE FUNCTION volume_rotations_erase();
