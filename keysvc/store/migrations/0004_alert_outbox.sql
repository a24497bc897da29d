-- 0004: the alert outbox (issue 14). Each warning or critical VM event is
-- queued once per alert sink (a webhook URL, a syslog address) in the same
-- request that stored it, before the VM is answered, and stays here until
-- the sink took it. A row that failed for longer than the dead-letter age is
-- kept with dead = 1, counted in keysvc_alert_dead_letters, and no longer
-- retried.

CREATE TABLE alert_outbox (
	id         INTEGER PRIMARY KEY AUTOINCREMENT,
	sink       TEXT    NOT NULL,             -- "webhook:<url>" or "syslog:<addr>"
	idem_key   TEXT    NOT NULL,             -- the idempotency key the sink is sent
	event_id   INTEGER NOT NULL,             -- vm_events.id (the event may be purged first)
	body       BLOB    NOT NULL,             -- the JSON document to deliver
	created_ns INTEGER NOT NULL,
	attempts   INTEGER NOT NULL DEFAULT 0,
	next_ns    INTEGER NOT NULL,             -- not tried again before this
	last_error TEXT    NOT NULL DEFAULT '',
	dead       INTEGER NOT NULL DEFAULT 0 CHECK (dead IN (0, 1)),
	UNIQUE (sink, idem_key)
) STRICT;
CREATE INDEX alert_outbox_due ON alert_outbox (dead, next_ns);
