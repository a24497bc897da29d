-- 0003: row MACs and the store's genesis anchor (issue 12, items 2 and 4).
-- The key service computes and checks both under a key derived from the
-- master key; the store only keeps the bytes. Rows written before this
-- migration have a NULL row_mac until the key service adopts the store on its
-- first start with the master key (keysvc: adopt.go, docs/operator.md).

ALTER TABLE vms ADD COLUMN row_mac BLOB;
ALTER TABLE volumes ADD COLUMN row_mac BLOB;

-- One row, written when the key service adopted the store, in the same
-- transaction as the MACs of every existing row and the chain's genesis
-- record, whose seq and hash it names: a chain wiped (and begun again) no
-- longer holds that record. A store with VMs or volumes but no anchor was
-- tampered with.
CREATE TABLE store_anchor (
	id           INTEGER PRIMARY KEY CHECK (id = 1),
	created_ns   INTEGER NOT NULL,
	genesis_seq  INTEGER NOT NULL,
	genesis_hash BLOB    NOT NULL,
	mac          BLOB    NOT NULL
) STRICT;
