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
}

// test answers Tgetlock (F_GETLK): the first lock that conflicts with q,
// or q itself with type Unlock when none does; it takes nothing.
func (t *lockTable) test(f *file, q lockReq) lockReq {
	end := q.start + q.length
	if q.length == 0 || end < q.start {
		end = 0
	}
	owner := lockOwner{q.client, int(q.pid)}
	t.mu.Lock()
	defer t.mu.Unlock()
	if q.typ == p9.ReadLock || q.typ == p9.WriteLock {
		for _, l := range t.files[f.path] {
			if l.owner != owner && l.overlaps(q.start, end) && (l.write || q.typ == p9.WriteLock) {
				c := lockReq{typ: p9.ReadLock, start: l.start, pid: uint32(l.owner.pid), client: l.owner.client}
				if l.write {
					c.typ = p9.WriteLock
				}
				if l.end != 0 {
					c.length = l.end - l.start
				}
				return c
			}
		}
	}
	q.typ = p9.Unlock
	return q
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
func (f *file) Lock(pid int, typ p9.LockType, _ p9.LockFlags, start, length uint64, client string) (p9.LockStatus, error) {
	switch typ {
	case p9.ReadLock, p9.WriteLock, p9.Unlock:
	default:
		return p9.LockStatusError, nil
	}
	return f.s.locks.lock(f, pid, typ, start, length, client), nil
}
