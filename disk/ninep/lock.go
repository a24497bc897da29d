package ninep

import (
	"slices"
	"strings"
	"sync"

	"github.com/hugelgupf/p9/p9"
)

// POSIX record locks (fcntl F_SETLK/F_SETLKW), as 9P2000.L's Tlock carries
// them: advisory byte ranges per file, owned by a (client, pid) pair. They
// are what SQLite and other databases use to share a file between
// processes, so every process that mounts the export sees the same table.
//
// The server never blocks: a conflicting request answers "blocked", and
// Linux's v9fs retries F_SETLKW itself. A lock lives until its owner
// unlocks it or closes the fid it was taken through (the kernel unlocks on
// close, and the server clunks every fid of a connection that drops), so a
// crashed client cannot hold a lock forever.
//
// Tgetlock (F_GETLK), which hugelgupf/p9 v0.3.0 does not decode, arrives
// here as a probing Tlock (getlock.go).

type lockOwner struct {
	client string
	pid    int
}

type byteLock struct {
	owner      lockOwner
	write      bool
	start, end uint64 // [start, end); end 0 means to the end of any file
	fid        *file  // the fid it was taken through
}

func (l byteLock) overlaps(start, end uint64) bool {
	return (l.end == 0 || start < l.end) && (end == 0 || l.start < end)
}

// lockTable holds the record locks of every file, by clean path.
type lockTable struct {
	mu    sync.Mutex
	files map[string][]byteLock
	// conflicts found by probes, until their Rgetlock names them
	conflicts map[getlockReq]byteLock
}

// probe answers F_GETLK: whether a lock of typ over the range would
// conflict, remembering with which lock; it takes nothing.
func (t *lockTable) probe(f *file, pid int, typ p9.LockType, start, length uint64, client string) p9.LockStatus {
	end := start + length
	if length == 0 || end < start {
		end = 0
	}
	owner := lockOwner{client, pid}
	t.mu.Lock()
	defer t.mu.Unlock()
	if typ == p9.Unlock {
		return p9.LockStatusOK
	}
	for _, l := range t.files[f.path] {
		if l.owner != owner && l.overlaps(start, end) && (l.write || typ == p9.WriteLock) {
			if t.conflicts == nil {
				t.conflicts = map[getlockReq]byteLock{}
			}
			key := getlockReq{typ: typ, start: start, length: length, pid: uint32(pid), client: client}
			if _, ok := t.conflicts[key]; ok || len(t.conflicts) < 1024 { // bounded, whatever a client leaves behind
				t.conflicts[key] = l
			}
			return p9.LockStatusBlocked
		}
	}
	return p9.LockStatusOK
}

// renamed moves the locks of o (and of everything under it, for a
// directory) to n: locks follow the file, not the name. Locks of a file n
// replaced go with it: it has no name any more, and a new file there must
// not inherit them.
func (t *lockTable) renamed(o, n string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	moved := map[string][]byteLock{}
	for p, locks := range t.files {
		if p == n || strings.HasPrefix(p, n+"/") {
			delete(t.files, p)
		}
		if p == o || strings.HasPrefix(p, o+"/") {
			moved[n+strings.TrimPrefix(p, o)] = locks
			delete(t.files, p)
		}
	}
	for p, locks := range moved {
		t.files[p] = locks
	}
}

// removed drops the locks of an unlinked file, so that a new file under
// its name starts with none.
func (t *lockTable) removed(p string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.files, p)
}

// takeConflict returns (and forgets) the lock a probe for req found.
func (t *lockTable) takeConflict(req getlockReq) (byteLock, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	l, ok := t.conflicts[req]
	delete(t.conflicts, req)
	return l, ok
}

// lock applies one Tlock request.
func (t *lockTable) lock(f *file, pid int, typ p9.LockType, start, length uint64, client string) p9.LockStatus {
	end := start + length
	if length == 0 || end < start {
		end = 0 // to the end of the file, however long it grows
	}
	owner := lockOwner{client, pid}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.files == nil {
		t.files = map[string][]byteLock{}
	}
	locks := t.files[f.path]
	if typ != p9.Unlock {
		for _, l := range locks {
			if l.owner != owner && l.overlaps(start, end) && (l.write || typ == p9.WriteLock) {
				return p9.LockStatusBlocked
			}
		}
	}
	// The owner's own locks in the range are replaced (POSIX: a new lock
	// converts, an unlock splits), keeping the parts outside it.
	var out []byteLock
	for _, l := range locks {
		if l.owner != owner || !l.overlaps(start, end) {
			out = append(out, l)
			continue
		}
		if l.start < start {
			left := l
			left.end = start
			out = append(out, left)
		}
		if end != 0 && (l.end == 0 || l.end > end) {
			right := l
			right.start = end
			out = append(out, right)
		}
	}
	if typ != p9.Unlock {
		out = append(out, byteLock{owner: owner, write: typ == p9.WriteLock, start: start, end: end, fid: f})
	}
	t.set(f.path, out)
	return p9.LockStatusOK
}

// release drops every lock taken through fid f (its clunk).
func (t *lockTable) release(f *file) {
	t.mu.Lock()
	defer t.mu.Unlock()
	locks, ok := t.files[f.path]
	if !ok {
		return
	}
	t.set(f.path, slices.DeleteFunc(locks, func(l byteLock) bool { return l.fid == f }))
}

func (t *lockTable) set(p string, locks []byteLock) {
	if len(locks) == 0 {
		delete(t.files, p)
		return
	}
	t.files[p] = locks
}

// Lock serves Tlock.
func (f *file) Lock(pid int, typ p9.LockType, flags p9.LockFlags, start, length uint64, client string) (p9.LockStatus, error) {
	switch typ {
	case p9.ReadLock, p9.WriteLock, p9.Unlock:
	default:
		return p9.LockStatusError, nil
	}
	if flags&probeFlag != 0 {
		return f.s.locks.probe(f, pid, typ, start, length, client), nil
	}
	return f.s.locks.lock(f, pid, typ, start, length, client), nil
}
