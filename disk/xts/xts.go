package xts

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/keygate/keygate/keymem"
)

// BlockSize is the AES block size; every data unit is a multiple of it.
const BlockSize = 16

// ErrKeySize is returned by New for a key that is neither 32 nor 64 bytes.
var ErrKeySize = errors.New("xts: key must be 32 bytes (AES-128-XTS) or 64 bytes (AES-256-XTS)")

// Layout of the locked key schedule. Each schedule has room for AES-256's
// 15 round keys; the offsets are fixed so that the assembly can address
// them as constants (see the .s files).
const (
	schedSize = 15 * 16
	offEnc1   = 0             // data key, encryption round keys
	offDec1   = schedSize     // data key, equivalent-inverse-cipher round keys
	offEnc2   = 2 * schedSize // tweak key, encryption round keys
	// The VAES code uses round keys as 256- and 512-bit memory operands,
	// so enc1 and dec1 are also stored with each round key repeated four
	// times, one 64-byte line per round.
	offEnc1x4 = 768
	offDec1x4 = offEnc1x4 + 15*64
	ksSize    = offDec1x4 + 15*64
	// ks starts 64-byte aligned, so no operand splits a cache line (and the
	// SSE code's 16-byte operands meet their alignment rule). memguard puts
	// the data right before the guard page, so a multiple of 64 comes out
	// aligned already; New re-aligns anyway, hence the slack.
	lockedSize = ksSize + 64
)

// parallelMin is the batch size from which EncryptSectors and DecryptSectors
// spread the work over GOMAXPROCS goroutines, at most one per CPU. A core does 6-20 GB/s with
// AES-NI or VAES, so 256 KiB is 10-40µs of work, well above the microsecond
// or so that starting and joining the goroutines costs; smaller batches, the
// common 4 KiB page in particular, stay on the caller's goroutine.
const parallelMin = 256 << 10

// numCPU bounds the workers of a batch; a test raises it to run the split
// on any machine.
var numCPU = runtime.NumCPU()

// chunkBytes is the unit of work the goroutines of a large batch take turns
// at: small enough to balance, large enough that the shared counter is
// touched once per ~5µs of work.
const chunkBytes = 64 << 10

// Cipher is an XTS-AES cipher for one key. It is safe for concurrent use,
// except that Close must not race with the other methods.
type Cipher struct {
	buf    *lockedSchedule
	ks     []byte // buf's bytes from the aligned start; ksSize long
	nr     int    // AES rounds: 10 or 14
	impl   impl
	closed atomic.Bool
	// cleanup destroys buf if the Cipher is dropped without Close, so the
	// schedule is wiped and unlocked eventually even then.
	cleanup runtime.Cleanup
}

// New expands key (key1||key2 as in IEEE 1619: 32 bytes for XTS-AES-128, 64
// for XTS-AES-256) into locked memory, using the fastest implementation the
// CPU has. New does not keep key; the caller may wipe it afterwards.
func New(key []byte) (*Cipher, error) {
	return newWithImpl(key, bestImpl())
}

func newWithImpl(key []byte, im impl) (*Cipher, error) {
	if len(key) != 32 && len(key) != 64 {
		return nil, ErrKeySize
	}
	// Registered before the first key byte is written, so that a monitor
	// following the key-page registry never sees the schedule outside the
	// key pages.
	mb, err := keymem.New(lockedSize)
	if err != nil {
		return nil, fmt.Errorf("xts: key schedule: %w", err)
	}
	b := mb.Bytes()
	buf := &lockedSchedule{buf: mb}
	off := int(-uintptr(unsafe.Pointer(&b[0])) & 63)
	c := &Cipher{buf: buf, ks: b[off : off+ksSize], nr: len(key)/8 + 6, impl: im}
	c.cleanup = runtime.AddCleanup(c, (*lockedSchedule).destroy, buf)
	half := len(key) / 2
	expandKey(c.ks[offEnc1:offEnc1+schedSize], key[:half])
	expandKey(c.ks[offEnc2:offEnc2+schedSize], key[half:])
	invertKey(c.ks[offDec1:offDec1+schedSize], c.ks[offEnc1:offEnc1+schedSize], c.nr)
	for r := range c.nr + 1 {
		for lane := range 4 {
			o := 64*r + 16*lane
			copy(c.ks[offEnc1x4+o:offEnc1x4+o+16], c.ks[offEnc1+16*r:])
			copy(c.ks[offDec1x4+o:offDec1x4+o+16], c.ks[offDec1+16*r:])
		}
	}
	return c, nil
}

// lockedSchedule is the locked buffer of a key schedule and its entry in the
// key-page registry, which must go before the pages are unmapped (a monitor
// would otherwise guard, and report reads of, memory that no longer holds a
// key).
type lockedSchedule struct {
	buf *keymem.Buffer
}

func (l *lockedSchedule) destroy() { l.buf.Destroy() }

// Close wipes the key schedule and unlocks its memory. It is idempotent.
// Any later Encrypt or Decrypt panics.
func (c *Cipher) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		c.cleanup.Stop()
		c.buf.destroy()
		c.ks = nil
	}
	return nil
}

// Encrypt encrypts one data unit with the given tweak (its data-unit number,
// plain64). dst and src may be the same slice but must not otherwise
// overlap. It panics if len(src) is not a non-zero multiple of BlockSize, if
// dst is shorter than src, or if c is closed.
func (c *Cipher) Encrypt(dst, src []byte, tweak uint64) {
	c.check(dst, src)
	c.crypt(dst[:len(src)], src, tweak, false)
}

// Decrypt decrypts one data unit; it is the inverse of Encrypt and panics
// in the same cases.
func (c *Cipher) Decrypt(dst, src []byte, tweak uint64) {
	c.check(dst, src)
	c.crypt(dst[:len(src)], src, tweak, true)
}

// EncryptSectors encrypts len(src)/sectorSize consecutive sectors; sector i
// uses tweak firstTweak + i*tweakStep (wrapping at 2^64). LUKS2 with 4096-byte
// sectors counts tweaks in 512-byte units, so it passes tweakStep 8. Batches
// of 256 KiB or more are split over GOMAXPROCS goroutines (at most one per CPU). It panics if
// sectorSize is not a positive multiple of BlockSize, if len(src) is not a
// multiple of sectorSize, if dst is shorter than src, or if c is closed.
func (c *Cipher) EncryptSectors(dst, src []byte, sectorSize int, firstTweak, tweakStep uint64) {
	c.sectors(dst, src, sectorSize, firstTweak, tweakStep, false)
}

// DecryptSectors is the inverse of EncryptSectors and panics in the same
// cases.
func (c *Cipher) DecryptSectors(dst, src []byte, sectorSize int, firstTweak, tweakStep uint64) {
	c.sectors(dst, src, sectorSize, firstTweak, tweakStep, true)
}

func (c *Cipher) check(dst, src []byte) {
	if c.closed.Load() {
		panic("xts: use of closed Cipher")
	}
	if len(src) == 0 || len(src)%BlockSize != 0 {
		panic("xts: data unit is not a non-zero multiple of the block size")
	}
	if len(dst) < len(src) {
		panic("xts: dst is shorter than src")
	}
	if inexactOverlap(dst[:len(src)], src) {
		panic("xts: invalid buffer overlap")
	}
}

func (c *Cipher) sectors(dst, src []byte, sectorSize int, first, step uint64, dec bool) {
	if sectorSize <= 0 || sectorSize%BlockSize != 0 {
		panic("xts: sector size is not a positive multiple of the block size")
	}
	if len(src)%sectorSize != 0 {
		panic("xts: batch is not a whole number of sectors")
	}
	if len(src) == 0 {
		return
	}
	c.check(dst, src)
	n := len(src) / sectorSize
	// More workers than CPUs only hand the batch between threads (a
	// one-vCPU VM's keygate runs two Ps: see nbd.Attach).
	workers := min(runtime.GOMAXPROCS(0), numCPU)
	if len(src) < parallelMin || workers < 2 || n < 2 {
		c.run(dst, src, sectorSize, 0, n, first, step, dec)
		return
	}
	// Workers take chunks of about chunkBytes from a shared counter rather
	// than one fixed share each: on a busy machine (a VM whose other vCPU
	// is taken) a worker that is descheduled then holds up only its current
	// chunk, not half the batch. The caller is one of the workers.
	per := max(chunkBytes/sectorSize, 1)
	chunks := (n + per - 1) / per
	var next atomic.Int64
	work := func() {
		for {
			i := int(next.Add(1) - 1)
			if i >= chunks {
				return
			}
			c.run(dst, src, sectorSize, i*per, min((i+1)*per, n), first, step, dec)
		}
	}
	var wg sync.WaitGroup
	for range min(workers, chunks) - 1 {
		wg.Go(work)
	}
	work()
	wg.Wait()
}

// run processes sectors [lo, hi) of a checked batch.
func (c *Cipher) run(dst, src []byte, size, lo, hi int, first, step uint64, dec bool) {
	for i := lo; i < hi; i++ {
		o := i * size
		c.crypt(dst[o:o+size], src[o:o+size], first+uint64(i)*step, dec)
	}
}

// crypt dispatches one checked data unit to the chosen implementation.
func (c *Cipher) crypt(dst, src []byte, tweak uint64, dec bool) {
	if c.impl == implGeneric || !cryptAsm(c.impl, c.ks, c.nr, dst, src, tweak, dec) {
		cryptGeneric(c.ks, c.nr, dst, src, tweak, dec)
	}
	// c.ks is not Go memory: keep c, and so the buffer behind it, from
	// being cleaned up while the code above still reads it.
	runtime.KeepAlive(c)
}

// inexactOverlap reports whether x and y share memory at different offsets;
// in-place operation (identical slices) is fine, anything else would read
// blocks the loop has already overwritten.
func inexactOverlap(x, y []byte) bool {
	if len(x) == 0 || len(y) == 0 || &x[0] == &y[0] {
		return false
	}
	xs, ys := uintptr(unsafe.Pointer(&x[0])), uintptr(unsafe.Pointer(&y[0]))
	return xs < ys+uintptr(len(y)) && ys < xs+uintptr(len(x))
}
