-- 0001: the key service's first schema.
-- Times are Unix nanoseconds (UTC) in INTEGER columns, so that they round-trip
-- exactly (the audit hash covers them) and map onto PostgreSQL bigint.

CREATE TABLE vms (
	name                 TEXT    PRIMARY KEY,
	ek_pub_pem           TEXT    NOT NULL,
	ak_pub_pem           TEXT,                       -- NULL: no AK enrolled (prove by credential activation)
	provisioning_allowed INTEGER NOT NULL DEFAULT 0 CHECK (provisioning_allowed IN (0, 1)),
	revoked              INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1)),
	policy_json          TEXT    NOT NULL DEFAULT '{}',
	learn_armed          INTEGER NOT NULL DEFAULT 0 CHECK (learn_armed IN (0, 1)),
	created_ns           INTEGER NOT NULL,
	updated_ns           INTEGER NOT NULL
) STRICT;

CREATE TABLE volumes (
	id         TEXT    PRIMARY KEY,
	vm         TEXT    NOT NULL REFERENCES vms (name),
	sealed_uk  BLOB,                                  -- NULL once erased
	erased_ns  INTEGER,                               -- set when erased
	created_ns INTEGER NOT NULL,
	CHECK ((sealed_uk IS NULL) = (erased_ns IS NOT NULL))
) STRICT;
CREATE INDEX volumes_by_vm ON volumes (vm);

-- Challenge IDs already used, for replay refusal. A row can be purged once
-- the challenge itself has expired: an expired challenge is refused anyway.
CREATE TABLE used_challenges (
	id         TEXT    PRIMARY KEY,
	expires_ns INTEGER NOT NULL
) STRICT;
CREATE INDEX used_challenges_by_expiry ON used_challenges (expires_ns);

-- The audit chain. Integrity comes from the hash chain and MACs (package
-- keysvc/audit), not from these triggers; the triggers only stop the service
-- itself, or a careless operator, from editing history.
CREATE TABLE audit_log (
	seq       INTEGER PRIMARY KEY,
	time_ns   INTEGER NOT NULL,
	actor     TEXT    NOT NULL,
	action    TEXT    NOT NULL,
	subject   TEXT    NOT NULL,
	details   TEXT    NOT NULL,
	prev_hash BLOB    NOT NULL,
	hash      BLOB    NOT NULL,
	mac       BLOB    NOT NULL
) STRICT;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;

-- The MAC'd chain head (last seq and hash), written in the same transaction
-- as each record: the anchor that makes deleting tail rows visible.
CREATE TABLE audit_head (
	id   INTEGER PRIMARY KEY CHECK (id = 1),
	seq  INTEGER NOT NULL,
	hash BLOB    NOT NULL,
	mac  BLOB    NOT NULL
) STRICT;
