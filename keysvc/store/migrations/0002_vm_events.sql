-- 0002: events reported by VMs (monitor alerts and heartbeats), POST /v1/events.
-- Rows are kept until the retention purge; the warning and critical ones are
-- also in the audit chain, which is what proves they were received.

CREATE TABLE vm_events (
	id            INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: newest is highest
	received_ns   INTEGER NOT NULL,
	vm            TEXT    NOT NULL,
	volume        TEXT    NOT NULL,
	session_id    TEXT    NOT NULL,
	kind          TEXT    NOT NULL,
	severity      TEXT    NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
	severity_rank INTEGER NOT NULL CHECK (severity_rank IN (0, 1, 2)),
	event_json    TEXT    NOT NULL                   -- the event as accepted, a flat JSON object
) STRICT;
CREATE INDEX vm_events_by_vm ON vm_events (vm, id);
CREATE INDEX vm_events_by_time ON vm_events (received_ns);
