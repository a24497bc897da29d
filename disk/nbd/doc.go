// Package nbd owns keygate's NBD server: the block-level export of an
// unlocked volume, so that a guest kernel runs its own filesystem (journal,
// page cache, locks, mmap) on sectors keygate encrypts in user space.
//
// It speaks the fixed-newstyle handshake (NBD_OPT_GO, NBD_OPT_INFO with
// block-size constraints, NBD_OPT_EXPORT_NAME, NBD_OPT_LIST, NBD_OPT_ABORT)
// and simple replies to READ, WRITE, FLUSH, WRITE_ZEROES and DISC, with FUA,
// on many connections at once (NBD_FLAG_CAN_MULTI_CONN), as the NBD
// project's proto.md specifies. A write is acknowledged only once all of it
// is in the backend; a FLUSH or FUA answers only once it is durable.
//
// TRIM is not offered: punching holes in the image would tell the storage
// provider which blocks are free, and a hole reads back as noise through
// the cipher anyway. Structured replies, block status and TLS are not
// offered either (the socket is local and guarded by its mode and by the
// peer's uid).
//
// It does not own the encryption (disk.Blocks is the usual Backend) nor
// the socket (internal/unixsock), nor the kernel side (Attach).
package nbd
