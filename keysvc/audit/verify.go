package audit

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"fmt"
	"sort"

	"github.com/keygate/keygate/keysvc/store"
)

// Kind classifies a verification problem.
type Kind string

// Problem kinds; see the package doc for what each means.
const (
	KindEdited     Kind = "edited"      // hash does not match the record's contents
	KindForged     Kind = "forged"      // hash matches but the MAC does not
	KindMissing    Kind = "missing"     // seq gap: records deleted
	KindBrokenLink Kind = "broken-link" // prev_hash is not the previous record's hash
	KindTruncated  Kind = "truncated"   // the head names records after the last one
	KindHead       Kind = "head"        // the head is missing, forged, or disagrees
)

// Problem is one failed check. Seq is the first seq it concerns.
type Problem struct {
	Seq    uint64
	Kind   Kind
	Detail string
}

func (p Problem) String() string { return fmt.Sprintf("seq %d: %s: %s", p.Seq, p.Kind, p.Detail) }

// maxProblems bounds Report.Problems (a wrong key fails every record).
const maxProblems = 100

// Report is the result of Verify.
type Report struct {
	Records  uint64    // records read
	LastSeq  uint64    // seq of the last record read (0 if none)
	Head     uint64    // seq named by the head (0 if none)
	Problems []Problem // at most maxProblems, in seq order
	Omitted  int       // problems found beyond maxProblems
	// Retired counts the records written under a master key since
	// rotated away: their MACs can no longer be checked, and their
	// hashes and links tie them to the later switch record, whose MAC
	// was checked (keyswitch.go).
	Retired uint64
}

// OK reports whether the chain passed every check.
func (r Report) OK() bool { return len(r.Problems) == 0 }

func (r *Report) add(seq uint64, k Kind, format string, args ...any) {
	if len(r.Problems) >= maxProblems {
		r.Omitted++
		return
	}
	r.Problems = append(r.Problems, Problem{Seq: seq, Kind: k, Detail: fmt.Sprintf(format, args...)})
}

// Verify reads the whole chain and its head from one snapshot and checks, for
// every record in seq order: that seqs run 1, 2, 3, … without gaps; that the
// hash matches the contents; that the MAC matches the hash; and that
// prev_hash is the previous record's hash. Then it checks the head's MAC and
// that the head names the last record. See the package doc for what this
// does and does not detect.
//
// The Report lists every problem (up to 100). The error is nil if the chain
// is intact, wraps ErrTampered (naming the first problem) if not, and is
// some other error if the chain could not be read.
func (l *Log) Verify(ctx context.Context) (Report, error) {
	var (
		rep      Report
		expect   uint64 = 1
		prevHash        = make([]byte, sha256.Size)
		ks              = l.keys.Load()
		// unkeyed are the records whose MAC no key held checks; a later
		// switch record MAC'd under the current key retires them, and
		// the ones left at the end are forged. Capped like Problems.
		unkeyed  []uint64
		nUnkeyed uint64
	)
	head, err := l.st.ScanAudit(ctx, 1, func(r store.AuditRecord) error {
		rep.Records++
		linked := true
		if r.Seq != expect {
			if r.Seq > expect {
				rep.add(expect, KindMissing, "records %d to %d are missing (deleted)", expect, r.Seq-1)
			} else {
				rep.add(r.Seq, KindMissing, "record out of order after %d", expect-1)
			}
			linked = false // the predecessor is gone: the gap is the finding
		}
		switch {
		case !hmac.Equal(hashRecord(r), r.Hash):
			rep.add(r.Seq, KindEdited, "stored hash does not match the record's contents (the record was edited)")
		case hmac.Equal(mac(ks.cur, r.Hash), r.MAC):
			if isSwitch(r) {
				rep.Retired += nUnkeyed
				unkeyed, nUnkeyed = unkeyed[:0], 0
			}
		case ks.prev != nil && hmac.Equal(mac(ks.prev, r.Hash), r.MAC):
		default:
			if len(unkeyed) < maxProblems {
				unkeyed = append(unkeyed, r.Seq)
			}
			nUnkeyed++
		}
		if linked && !bytes.Equal(r.PrevHash, prevHash) {
			rep.add(r.Seq, KindBrokenLink, "prev_hash is not the hash of record %d (records were altered, replaced or reordered)", r.Seq-1)
		}
		rep.LastSeq = r.Seq
		prevHash = r.Hash
		expect = r.Seq + 1
		return nil
	})
	if err != nil {
		return Report{}, fmt.Errorf("verify audit chain: %w", err)
	}
	for _, seq := range unkeyed {
		rep.add(seq, KindForged, "MAC does not match (the record was forged or re-hashed without the key, or this is the wrong master key)")
	}
	rep.Omitted += int(nUnkeyed) - len(unkeyed)
	switch {
	case head == nil && rep.Records == 0:
		// An empty log.
	case head == nil:
		rep.add(rep.LastSeq, KindHead, "the chain head is missing (deleted)")
	default:
		rep.Head = head.Seq
		if !ks.headOK(head) {
			rep.add(head.Seq, KindHead, "the head's MAC does not match (forged head, or the wrong master key)")
		}
		switch {
		case head.Seq > rep.LastSeq:
			rep.add(rep.LastSeq+1, KindTruncated, "records %d to %d are missing from the end (the head names %d)", rep.LastSeq+1, head.Seq, head.Seq)
		case head.Seq < rep.LastSeq:
			rep.add(head.Seq+1, KindHead, "records %d to %d follow the head (appended without the key, or the head was rolled back)", head.Seq+1, rep.LastSeq)
		case !bytes.Equal(head.Hash, prevHash):
			rep.add(head.Seq, KindHead, "the head's hash is not record %d's hash", head.Seq)
		}
	}
	if !rep.OK() {
		sort.SliceStable(rep.Problems, func(i, j int) bool { return rep.Problems[i].Seq < rep.Problems[j].Seq })
		return rep, fmt.Errorf("%w: %d problem(s), first %s", ErrTampered, len(rep.Problems)+rep.Omitted, rep.Problems[0])
	}
	return rep, nil
}

// Scan calls fn for each record with seq >= from, in seq order. It does not
// verify them; use Verify for that.
func (l *Log) Scan(ctx context.Context, from uint64, fn func(Record) error) error {
	_, err := l.st.ScanAudit(ctx, from, func(r store.AuditRecord) error { return fn(fromStore(r)) })
	if err != nil {
		return fmt.Errorf("scan audit: %w", err)
	}
	return nil
}
