// Package luks2 owns keygate's LUKS2 on-disk format: it creates, opens and
// updates LUKS2 volume headers exactly as cryptsetup 2.6 does, so that the
// same image and key file open in both tools.
//
// It owns the binary header (both copies, checksums, seqid), the JSON
// metadata (keyslots, segments, digests, tokens, config, preserving fields it
// does not know), the anti-forensic splitter, keyslot key derivation
// (pbkdf2, argon2id, argon2i), the volume-key digest and keygate's own token
// type. The exact profile written and accepted is docs/format.md ("format
// profile v1").
//
// It does not own the data segment's sectors: Volume.Segment reports where
// they start and how they are encrypted, and the disk adapter encrypts them
// with package disk/xts. It does not own where keys come from (key files,
// the key service, the TPM).
//
// Secrets (the volume key, derived keyslot keys, AF-split material) live in
// memguard LockedBuffers. Heap temporaries are wiped on every exit path;
// key bytes never appear in errors or logs. A Volume is not safe for
// concurrent use.
package luks2
