-- 0006: authenticated pending rotations, as SQLite's 0009: the volume's
-- rotation generation and pending state under its row MAC, and a MAC on
-- each pending rotation over its volume, generation, sealed key and state.

ALTER TABLE volumes ADD COLUMN rotation bigint NOT NULL DEFAULT 0;
ALTER TABLE volumes ADD COLUMN rotation_pending boolean NOT NULL DEFAULT false;

ALTER TABLE volume_rotations ADD COLUMN generation bigint NOT NULL DEFAULT 0;
ALTER TABLE volume_rotations ADD COLUMN released boolean NOT NULL DEFAULT false;
ALTER TABLE volume_rotations ADD COLUMN cancelling boolean NOT NULL DEFAULT false;
ALTER TABLE volume_rotations ADD COLUMN row_mac bytea;
