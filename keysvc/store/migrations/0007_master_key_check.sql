-- 0007: the master key every keysvc using this database must hold, as a
-- fingerprint (a hash of a key derived from it, never the key), recorded on
-- first use. A keysvc started with another master key refuses to run.

CREATE TABLE master_key_check (
	id          INTEGER PRIMARY KEY CHECK (id = 1),
	fingerprint BLOB    NOT NULL,
	created_ns  INTEGER NOT NULL
) STRICT;
