package cache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"

	"slipway/cache/tier"
)

// The shared tier. In a fleet (Options.Shared set) an S3-compatible object
// store is the source of truth and this store is the replica's read-through
// tier in front of it:
//   - Local repositories live in the shared tier: their tags, links,
//     referrers and existence are read from it and written to it first, so
//     a push one replica acknowledged is visible on every replica at once,
//     and a DELETE on one is a 404 on all. When it cannot be reached, reads
//     fall back to what this replica holds and writes fail with
//     ErrSharedUnavailable (a 503: nothing is acknowledged that is not
//     durable).
//   - A pushed blob is in the shared tier before its push is acknowledged.
//   - What a fill stores (blobs, manifests, pulled tags) goes to the shared
//     tier behind the response, through a queue kept in the index, so it
//     survives a restart and drains when the tier comes back.
//   - What this replica lacks is read from the shared tier (manifests,
//     pulled tags here; blobs through the fills of package upstream).
//   - Locally, pushed content is evicted like pulled content: the shared
//     tier keeps it. Only what still waits in the queue is kept.

// ErrSharedUnavailable is a write the shared tier could not take: it is not
// acknowledged.
var ErrSharedUnavailable = errors.New("cache: the shared tier is unavailable")

// Shared is the shared tier, or nil when the store is alone.
func (s *Store) Shared() *tier.Client { return s.shared }

// tierCtx bounds one call into the shared tier made on behalf of a
// request (the store's API takes no context).
func tierCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 30*time.Second)
}

// sharedErr maps the tier's errors onto the store's.
func sharedErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, tier.ErrNotFound):
		return fmt.Errorf("%w: %v", ErrNotFound, err)
	case errors.Is(err, tier.ErrUnavailable), errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("%w: %v", ErrSharedUnavailable, err)
	}
	return err
}

// down reports whether err means the shared tier could not be reached, so
// that a read may fall back to this replica's own copy.
func down(err error) bool {
	return errors.Is(err, tier.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded)
}

// renewAfter is how old a blob in the shared tier may be before a push of
// it again renews it; the GC grace is much longer.
const renewAfter = 10 * time.Minute

// ensureShared puts stored blob d into the shared tier if it is not there:
// a push is acknowledged only after that.
func (s *Store) ensureShared(d digest.Digest) error {
	ctx, cancel := tierCtx()
	defer cancel()
	if info, err := s.shared.StatBlob(ctx, d); err == nil {
		if time.Since(info.Modified) > renewAfter {
			// Pushed again: a use, so the shared GC's grace starts again.
			return sharedErr(s.shared.TouchBlob(ctx, d))
		}
		return nil
	} else if !errors.Is(err, tier.ErrNotFound) {
		return sharedErr(err)
	}
	f, err := os.Open(s.blobPath(d))
	if err != nil {
		return fmt.Errorf("cache: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("cache: %w", err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	return sharedErr(s.shared.PutBlob(ctx, d, f, fi.Size()))
}

// sharedHeld checks, in the shared tier, that local repository repo holds
// ref with its size: what another replica pushed.
func (s *Store) sharedHeld(ctx context.Context, repo string, h Ref) error {
	linked, err := s.shared.Linked(ctx, repo, h.Digest)
	if err != nil {
		return sharedErr(err)
	}
	if !linked {
		return fmt.Errorf("%w: %s", ErrRefUnknown, h.Digest)
	}
	var size int64
	if h.Manifest {
		b, _, err := s.shared.Manifest(ctx, h.Digest)
		if errors.Is(err, tier.ErrNotFound) {
			return fmt.Errorf("%w: manifest %s", ErrRefUnknown, h.Digest)
		}
		if err != nil {
			return sharedErr(err)
		}
		size = int64(len(b))
	} else {
		info, err := s.shared.StatBlob(ctx, h.Digest)
		if errors.Is(err, tier.ErrNotFound) {
			return fmt.Errorf("%w: blob %s", ErrRefUnknown, h.Digest)
		}
		if err != nil {
			return sharedErr(err)
		}
		size = info.Size
	}
	if h.Size >= 0 && h.Size != size {
		return fmt.Errorf("%w: %s has %d bytes, the manifest says %d", ErrRefSize, h.Digest, size, h.Size)
	}
	return nil
}

// putSharedManifest writes a pushed manifest and everything that comes
// with it to the shared tier: the manifest, its link, its tags, its
// referrer entry, the repository. Then it waits out a shared GC sweep
// that may have begun before the writes, and checks that everything the
// manifest holds is still there (see sharedGC).
func (s *Store) putSharedManifest(p ManifestPut, held []Ref) error {
	ctx, cancel := tierCtx()
	defer cancel()
	m := p.Manifest
	if err := s.shared.PutManifest(ctx, m.Digest, m.MediaType, m.Bytes); err != nil {
		return sharedErr(err)
	}
	if err := s.shared.Link(ctx, p.Repo, m.Digest); err != nil {
		return sharedErr(err)
	}
	if subject, desc, ok := Referrer(m); ok {
		b, err := json.Marshal(desc)
		if err != nil {
			return err
		}
		if err := s.shared.PutReferrer(ctx, p.Repo, subject, m.Digest, b); err != nil {
			return sharedErr(err)
		}
	}
	for _, tag := range p.Tags {
		if err := s.shared.SetTag(ctx, p.Repo, tag, m.Digest); err != nil {
			return sharedErr(err)
		}
	}
	if err := s.shared.AddRepository(ctx, p.Repo); err != nil {
		return sharedErr(err)
	}
	if err := s.awaitSweep(ctx); err != nil {
		return err
	}
	for _, h := range held {
		if err := s.sharedHeld(ctx, p.Repo, h); errors.Is(err, ErrRefUnknown) && !h.Manifest {
			// A sweep took it after the check: put it back from here if
			// this replica has it, else the push is refused.
			if _, lerr := os.Stat(s.blobPath(h.Digest)); lerr != nil {
				s.undoSharedTags(p)
				return err
			}
			if err := s.ensureShared(h.Digest); err != nil {
				return err
			}
		} else if err != nil {
			s.undoSharedTags(p)
			return err
		}
	}
	return nil
}

// undoSharedTags takes back the tags a refused manifest PUT wrote.
func (s *Store) undoSharedTags(p ManifestPut) {
	ctx, cancel := tierCtx()
	defer cancel()
	for _, tag := range p.Tags {
		if d, err := s.shared.Tag(ctx, p.Repo, tag); err == nil && d == p.Manifest.Digest {
			s.shared.DeleteTag(ctx, p.Repo, tag)
		}
	}
}

// The queue of what goes to the shared tier behind a response: 'q' keys
// (keys.go), each removed once its object is in the tier.

// queueIn records, in txn, that k must go to the shared tier.
func (s *Store) queueIn(txn *badger.Txn, k []byte) error {
	if s.shared == nil {
		return nil
	}
	return txn.Set(k, nil)
}

// queuedIn reports whether blob d still waits for the shared tier.
func queuedIn(txn *badger.Txn, d digest.Digest) bool {
	ok, _ := hasIn(txn, keyQueueBlob(d))
	return ok
}

// QueueLen is how many objects wait for the shared tier.
func (s *Store) QueueLen() (int, error) {
	n := 0
	err := s.ix.view(func(txn *badger.Txn) error {
		return each(txn, keyAll(prefixQueue), nil, false, func(*badger.Item) error {
			n++
			return nil
		})
	})
	return n, err
}

// drain sends the queue to the shared tier until Close, backing off while
// the tier is down.
func (s *Store) drain() {
	defer s.wg.Done()
	wait := time.Second
	for {
		select {
		case <-s.stop:
			return
		case <-s.queueKick:
		case <-time.After(wait):
		}
		n, err := s.drainOnce(256)
		switch {
		case err != nil && down(err):
			wait = min(2*wait, 30*time.Second)
			s.log.Warn("the shared tier is unavailable: writes wait in the queue", "err", err)
		case err != nil && !errors.Is(err, ErrClosed):
			s.log.Warn("shared tier queue", "err", err)
			wait = 5 * time.Second
		case n > 0:
			wait = 10 * time.Millisecond // more may wait
		default:
			wait = time.Second
		}
	}
}

// DrainQueue sends up to max queued objects to the shared tier now; it
// returns how many went. Tests and shutdown call it; the drain loop does
// on its own.
func (s *Store) DrainQueue(max int) (int, error) { return s.drainOnce(max) }

func (s *Store) drainOnce(max int) (int, error) {
	var keys [][]byte
	err := s.ix.view(func(txn *badger.Txn) error {
		return each(txn, keyAll(prefixQueue), nil, false, func(item *badger.Item) error {
			keys = append(keys, item.KeyCopy(nil))
			if len(keys) == max {
				return errStop
			}
			return nil
		})
	})
	if err != nil {
		return 0, err
	}
	done := 0
	for _, k := range keys {
		if err := s.sendQueued(k); err != nil {
			return done, err
		}
		if err := s.ix.update(func(txn *badger.Txn) error { return txn.Delete(k) }); err != nil {
			return done, err
		}
		done++
	}
	return done, nil
}

// sendQueued puts one queued object into the shared tier. What is no
// longer stored here (evicted, collected) is done: there is nothing to
// send.
func (s *Store) sendQueued(k []byte) error {
	kind, parts, ok := parseQueueKey(k)
	if !ok {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	switch kind {
	case queueBlob:
		d := digest.Digest(parts[0])
		if _, err := s.StatBlob(d); errors.Is(err, ErrNotFound) {
			return nil
		}
		f, err := os.Open(s.blobPath(d))
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return err
		}
		return s.shared.PutBlob(ctx, d, f, fi.Size())
	case queueManifest:
		m, err := s.localManifest(digest.Digest(parts[0]), true)
		if errors.Is(err, ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		return s.shared.PutManifest(ctx, m.Digest, m.MediaType, m.Bytes)
	case queueTag:
		t, err := s.localTag(parts[0], parts[1], parts[2])
		if errors.Is(err, ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		return s.shared.SetPulledTag(ctx, parts[0], parts[1], parts[2], tier.PulledTag{Digest: t.Digest, FetchedAt: t.FetchedAt})
	}
	return nil
}

// existsCache remembers local repositories the shared tier says do not
// exist, for a moment: routing asks about every name a client uses.
type existsCache struct {
	mu    sync.Mutex
	until map[string]time.Time
}

const (
	absentFor     = 2 * time.Second
	maxAbsentKept = 4096
)

func (c *existsCache) absent(name string, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return now.Before(c.until[name])
}

func (c *existsCache) note(name string, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.until == nil {
		c.until = map[string]time.Time{}
	}
	if len(c.until) >= maxAbsentKept {
		for k, t := range c.until {
			if now.After(t) {
				delete(c.until, k)
			}
		}
		if len(c.until) >= maxAbsentKept {
			return
		}
	}
	c.until[name] = now.Add(absentFor)
}

func (c *existsCache) forget(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.until, name)
}

// page cuts a sorted list after last, to at most n (n <= 0: all).
func page(list []string, last string, n int) []string {
	if last != "" {
		i, found := slices.BinarySearch(list, last)
		if found {
			i++
		}
		list = list[i:]
	}
	if n > 0 && len(list) > n {
		list = list[:n]
	}
	return list
}
