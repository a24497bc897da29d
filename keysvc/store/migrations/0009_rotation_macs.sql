-- 0009: authenticated pending rotations (issue 15, found in review). A
-- volume counts the unwrap-key rotations begun on it (rotation: the
-- generation of the latest) and says whether one is pending; both are under
-- the volume's row MAC (keysvc: rowauth.go). A pending rotation names its
-- generation and carries its own MAC, over the volume ID, that generation,
-- the sealed pending UK and its state, so a row kept from an earlier
-- rotation (an older generation, or one the volume no longer has pending)
-- is refused instead of released. released: the pending UK was sent to the
-- VM at least once (a cancel then waits for the VM to say which key its
-- image holds); cancelling: an operator cancelled it after that.
--
-- Rows of rotations begun before this migration have generation 0 and no
-- MAC: the key service refuses them as it refuses any row without a MAC
-- (docs/operator.md, "Upgrading with a rotation pending").

ALTER TABLE volumes ADD COLUMN rotation INTEGER NOT NULL DEFAULT 0;
ALTER TABLE volumes ADD COLUMN rotation_pending INTEGER NOT NULL DEFAULT 0;

ALTER TABLE volume_rotations ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
ALTER TABLE volume_rotations ADD COLUMN released INTEGER NOT NULL DEFAULT 0;
ALTER TABLE volume_rotations ADD COLUMN cancelling INTEGER NOT NULL DEFAULT 0;
ALTER TABLE volume_rotations ADD COLUMN row_mac BLOB;
