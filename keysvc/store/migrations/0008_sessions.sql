-- 0008: state of VM sessions shared by every replica (issue 15).
--
-- service_keys holds secrets of the key service itself, sealed under the
-- master key (AEAD with the name as additional data) and re-sealed by a
-- master-key rotation like the UKs: the session MAC key, so that session
-- tokens outlive a rotation and a restart.
--
-- reattest_sessions is the re-attestation state of serving sessions: the
-- last good re-attestation and when the session is due again (stale after
-- due_ns), whether a failed re-attestation locked it, and whether a sweep
-- flagged it stale (once, by whichever replica claims it first). mac is the
-- key service's MAC over id, vm, volume and locked_ns (keysvc:
-- reattest_store.go), so that a locked row cannot be edited into an unlocked
-- one without detection.

CREATE TABLE service_keys (
	name   TEXT PRIMARY KEY,
	sealed BLOB NOT NULL
) STRICT;

CREATE TABLE reattest_sessions (
	id          TEXT    PRIMARY KEY,
	vm          TEXT    NOT NULL,
	volume      TEXT    NOT NULL,
	interval_ns INTEGER NOT NULL,
	last_ns     INTEGER NOT NULL,
	due_ns      INTEGER NOT NULL,
	locked_ns   INTEGER NOT NULL DEFAULT 0,
	stale_ns    INTEGER NOT NULL DEFAULT 0,
	mac         BLOB    NOT NULL
) STRICT;

CREATE INDEX reattest_sessions_due ON reattest_sessions (due_ns) WHERE locked_ns = 0 AND stale_ns = 0;
