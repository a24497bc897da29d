package luks2

import (
	"errors"
	"fmt"
	"strings"
)

// Sentinels for callers that must branch. Errors returned by this package
// wrap one of them (or a typed error that matches one with errors.Is).
var (
	// ErrWrongKey: no keyslot opened with the given passphrase.
	ErrWrongKey = errors.New("wrong passphrase or key file")
	// ErrNotLUKS2: neither header copy carries the LUKS2 magic.
	ErrNotLUKS2 = errors.New("not a LUKS2 volume")
	// ErrCorruptHeader: a header copy failed a check; see HeaderError.
	ErrCorruptHeader = errors.New("corrupt LUKS2 header")
	// ErrLastKeyslot: removing the keyslot would leave no way to unlock.
	ErrLastKeyslot = errors.New("refusing to remove the last keyslot")
	// ErrTruncated: the image is shorter than its header says it must be.
	ErrTruncated = errors.New("image is truncated")
	// ErrNotSupported: the volume uses a feature keygate does not implement.
	ErrNotSupported = errors.New("not supported")
	// ErrNoSpace: no free keyslot id, keyslot area or token id is left, or
	// the JSON metadata no longer fits its area.
	ErrNoSpace = errors.New("no space left in the LUKS2 header")
)

// Names of the checks a header copy must pass, in the order they run.
// HeaderError.Check holds one of them.
const (
	CheckShort    = "short read"
	CheckMagic    = "magic"
	CheckVersion  = "version"
	CheckSize     = "hdr_size"
	CheckOffset   = "hdr_offset"
	CheckChecksum = "checksum"
	CheckJSON     = "json"
	CheckMetadata = "metadata"
)

// HeaderError says which check one header copy failed.
type HeaderError struct {
	Copy   string // "primary" or "secondary"
	Offset int64  // where the copy was looked for
	Check  string // one of the Check* constants
	Detail string // what was found, never a secret
}

func (e *HeaderError) Error() string {
	return fmt.Sprintf("%s header at offset %d: %s: %s", e.Copy, e.Offset, e.Check, e.Detail)
}

// Is makes a HeaderError match ErrCorruptHeader, and ErrNotLUKS2 when the
// magic is missing.
func (e *HeaderError) Is(target error) bool {
	return target == ErrCorruptHeader || (target == ErrNotLUKS2 && e.Check == CheckMagic)
}

// BothCopiesError is returned by Open when neither header copy is usable.
type BothCopiesError struct {
	Primary, Secondary *HeaderError
}

func (e *BothCopiesError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "primary header: %s (%s); secondary header: ", e.Primary.Check, e.Primary.Detail)
	if e.Secondary == nil {
		b.WriteString("not found at any offset cryptsetup uses")
	} else {
		fmt.Fprintf(&b, "%s (%s)", e.Secondary.Check, e.Secondary.Detail)
	}
	if e.Is(ErrNotLUKS2) {
		b.WriteString("; this is not a LUKS2 volume (format it first)")
	} else {
		b.WriteString("; both header copies are damaged: restore the header from a backup (cryptsetup luksHeaderRestore)")
	}
	return b.String()
}

// Is matches ErrCorruptHeader, or ErrNotLUKS2 when no copy has the magic.
func (e *BothCopiesError) Is(target error) bool {
	noMagic := e.Primary.Check == CheckMagic &&
		(e.Secondary == nil || e.Secondary.Check == CheckMagic || e.Secondary.Check == CheckShort)
	if target == ErrNotLUKS2 {
		return noMagic
	}
	return target == ErrCorruptHeader && !noMagic
}

// UnsupportedError names a feature the volume uses that keygate lacks.
type UnsupportedError struct {
	Feature, Reason string
}

func (e *UnsupportedError) Error() string {
	return fmt.Sprintf("%s is not supported: %s", e.Feature, e.Reason)
}

// Is matches ErrNotSupported.
func (e *UnsupportedError) Is(target error) bool { return target == ErrNotSupported }

func unsupported(feature, format string, args ...any) error {
	return &UnsupportedError{Feature: feature, Reason: fmt.Sprintf(format, args...)}
}
