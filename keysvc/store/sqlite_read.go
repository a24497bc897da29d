package store

import (
	"context"
	"database/sql"
)

// hotReaders is how many connections queryRow keeps pinned for the
// per-request reads (a VM and its volume, before a release and again after
// it). Two cores run the service; more readers than that only queue inside
// SQLite.
const hotReaders = 4

// readConn is one pinned connection and the statements prepared on it. It
// is held by one goroutine at a time (taken from SQLite.readers), so its map
// needs no lock.
type readConn struct {
	conn  *sql.Conn
	stmts map[string]*sql.Stmt
}

// openReaders pins hotReaders connections for queryRow.
func (s *SQLite) openReaders(ctx context.Context) error {
	s.readers = make(chan *readConn, hotReaders)
	for range hotReaders {
		c, err := s.db.Conn(ctx)
		if err != nil {
			return err
		}
		s.readers <- &readConn{conn: c, stmts: make(map[string]*sql.Stmt)}
		s.nReaders++
	}
	return nil
}

// closeReaders waits for every pinned reader to come back and closes it.
func (s *SQLite) closeReaders() {
	for range s.nReaders {
		rc := <-s.readers
		for _, st := range rc.stmts {
			st.Close()
		}
		rc.conn.Close()
	}
	s.nReaders = 0
}

// queryRow runs a single-row query on a pinned reader; the row must be
// scanned (Scan gives the reader back).
//
// The hot reads go through pinned connections and statements prepared on
// each, not through the pool and database-wide statements: those take
// database/sql's one pool mutex (DB.mu) four times a query: connection out
// and back, and the rows' dependency bookkeeping in and out. Under load that
// mutex was the service's most contended lock, and on a busy machine a
// goroutine descheduled while holding it stalled every reader at once. A
// statement prepared on a pinned connection takes it twice (the bookkeeping),
// and the wait for a free reader is a channel receive.
func (s *SQLite) queryRow(ctx context.Context, query string, args ...any) rowScanner {
	var rc *readConn
	select {
	case rc = <-s.readers:
	case <-ctx.Done():
		return errRow{ctx.Err()}
	}
	st, ok := rc.stmts[query]
	if !ok {
		var err error
		if st, err = rc.conn.PrepareContext(ctx, query); err != nil {
			s.readers <- rc
			return errRow{err}
		}
		rc.stmts[query] = st
	}
	return &pinnedRow{row: st.QueryRowContext(ctx, args...), rc: rc, s: s}
}

// pinnedRow is a row read on a pinned reader, given back once scanned.
type pinnedRow struct {
	row *sql.Row
	rc  *readConn
	s   *SQLite
}

func (r *pinnedRow) Scan(dest ...any) error {
	err := r.row.Scan(dest...)
	if r.rc != nil {
		r.s.readers <- r.rc
		r.rc = nil
	}
	return err
}

// errRow is a row that could not be read.
type errRow struct{ err error }

func (r errRow) Scan(...any) error { return r.err }
