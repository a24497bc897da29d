-- 0005: state of VM sessions shared by every replica, as SQLite's 0008:
-- the key service's sealed secrets (the session MAC key) and the
-- re-attestation state of serving sessions (last good re-attestation, when
-- it is due again, locked, flagged stale), MAC'd by the key service.

CREATE TABLE service_keys (
	name   text  PRIMARY KEY,
	sealed bytea NOT NULL
);

CREATE TABLE reattest_sessions (
	id          text   PRIMARY KEY,
	vm          text   NOT NULL,
	volume      text   NOT NULL,
	interval_ns bigint NOT NULL,
	last_ns     bigint NOT NULL,
	due_ns      bigint NOT NULL,
	locked_ns   bigint NOT NULL DEFAULT 0,
	stale_ns    bigint NOT NULL DEFAULT 0,
	mac         bytea  NOT NULL
);

CREATE INDEX reattest_sessions_due ON reattest_sessions (due_ns) WHERE locked_ns = 0 AND stale_ns = 0;
