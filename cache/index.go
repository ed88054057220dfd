package cache

import (
	"bytes"
	"errors"
	"sync/atomic"

	"github.com/dgraph-io/badger/v4"
)

// index owns the badger database: every transaction, iterator and batch of
// the store goes through it, and it alone turns badger's errors into the
// store's (a missing key is ErrNotFound, a closed database ErrClosed).
type index struct {
	db *badger.DB
	// writes counts read-write transactions and batches, each once it
	// has committed (or failed): what memory holds of the index (hotKeys)
	// is good while this has not moved since it was read.
	writes atomic.Uint64
}

// errStop ends an each loop early without an error.
var errStop = errors.New("stop")

func mapErr(err error) error {
	switch {
	case errors.Is(err, badger.ErrKeyNotFound):
		return ErrNotFound
	case errors.Is(err, badger.ErrDBClosed):
		return ErrClosed
	}
	return err
}

// view runs fn in a read-only transaction.
func (x *index) view(fn func(txn *badger.Txn) error) error {
	return mapErr(x.db.View(fn))
}

// update runs fn in a read-write transaction, again when a concurrent one
// conflicted with it (it read a key another wrote meanwhile).
func (x *index) update(fn func(txn *badger.Txn) error) error {
	defer x.writes.Add(1)
	var err error
	for range 16 {
		err = x.db.Update(fn)
		if !errors.Is(err, badger.ErrConflict) {
			break
		}
	}
	return mapErr(err)
}

// get reads one key's value (a copy); a missing key is ErrNotFound.
func (x *index) get(key []byte) ([]byte, error) {
	var v []byte
	err := x.view(func(txn *badger.Txn) error {
		var err error
		v, err = getIn(txn, key)
		return err
	})
	return v, err
}

// has reports whether key exists.
func (x *index) has(key []byte) (bool, error) {
	var ok bool
	err := x.view(func(txn *badger.Txn) error {
		var err error
		ok, err = hasIn(txn, key)
		return err
	})
	return ok, err
}

func (x *index) set(key, value []byte) error {
	return x.update(func(txn *badger.Txn) error { return txn.Set(key, value) })
}

// batch writes many independent keys at once (no reads, no conflicts).
func (x *index) batch(fn func(wb *badger.WriteBatch) error) error {
	defer x.writes.Add(1) // after the Cancel below: deferred calls run last first
	wb := x.db.NewWriteBatch()
	defer wb.Cancel()
	if err := fn(wb); err != nil {
		return mapErr(err)
	}
	return mapErr(wb.Flush())
}

// getIn reads key's value (a copy) in txn; missing: ErrNotFound.
func getIn(txn *badger.Txn, key []byte) ([]byte, error) {
	item, err := txn.Get(key)
	if err != nil {
		return nil, mapErr(err)
	}
	return item.ValueCopy(nil)
}

// hasIn reports whether key exists in txn.
func hasIn(txn *badger.Txn, key []byte) (bool, error) {
	_, err := txn.Get(key)
	if errors.Is(err, badger.ErrKeyNotFound) {
		return false, nil
	}
	return err == nil, mapErr(err)
}

// anyWithPrefix reports whether any key starts with prefix.
func anyWithPrefix(txn *badger.Txn, prefix []byte) bool {
	found := false
	each(txn, prefix, nil, false, func(*badger.Item) error {
		found = true
		return errStop
	})
	return found
}

// each calls fn for every key with prefix, in key order, from the first
// key at or after start (nil: the prefix itself). values: prefetch values
// (for scans that read most of them; small inline values are read in
// place either way). fn returning errStop ends the loop without an error.
// The item is valid only during fn.
func each(txn *badger.Txn, prefix, start []byte, values bool, fn func(*badger.Item) error) error {
	o := badger.DefaultIteratorOptions
	o.Prefix = prefix
	o.PrefetchValues = values
	it := txn.NewIterator(o)
	defer it.Close()
	if start == nil {
		start = prefix
	}
	for it.Seek(start); it.ValidForPrefix(prefix); it.Next() {
		if err := fn(it.Item()); err != nil {
			if errors.Is(err, errStop) {
				return nil
			}
			return err
		}
	}
	return nil
}

// keysWithPrefix lists the keys after prefix (suffixes), in order, after
// last, at most n (n <= 0: all).
func (x *index) keysWithPrefix(prefix []byte, last string, n int) ([]string, error) {
	var out []string
	var start []byte
	if last != "" {
		start = append(append(bytes.Clone(prefix), last...), 0) // the first key after last
	}
	err := x.view(func(txn *badger.Txn) error {
		return each(txn, prefix, start, false, func(item *badger.Item) error {
			out = append(out, string(item.Key()[len(prefix):]))
			if n > 0 && len(out) == n {
				return errStop
			}
			return nil
		})
	})
	return out, err
}

// cursor walks the keys of one prefix forward, for a merge with another
// walk in the same order.
type cursor struct {
	it *badger.Iterator
}

func newCursor(txn *badger.Txn, prefix []byte) *cursor {
	o := badger.DefaultIteratorOptions
	o.Prefix = prefix
	o.PrefetchValues = false
	c := &cursor{it: txn.NewIterator(o)}
	c.it.Rewind()
	return c
}

// valueAt moves to the key whose part after the prefix byte is name, if
// there is one at or after where the cursor stands, and calls fn with its
// value. Names must come in increasing order.
func (c *cursor) valueAt(name []byte, fn func(v []byte)) {
	for c.it.Valid() && bytes.Compare(c.it.Item().Key()[1:], name) < 0 {
		c.it.Next()
	}
	if c.it.Valid() && bytes.Equal(c.it.Item().Key()[1:], name) {
		c.it.Item().Value(func(v []byte) error {
			fn(v)
			return nil
		})
	}
}

func (c *cursor) close() { c.it.Close() }
