package cache

import (
	"bytes"
	"container/heap"
	"errors"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// Pin keeps content from eviction: the manifests that matching tags point
// at and every blob they reference; with Tag empty, everything matching
// repositories reference. NS is an upstream host ("registry-1.docker.io");
// Repo and Tag are path.Match patterns, empty meaning any.
type Pin struct {
	NS, Repo, Tag string
}

func (p Pin) matchRepo(ns, repo string) bool {
	if p.NS != ns {
		return false
	}
	if p.Repo == "" {
		return true
	}
	ok, _ := path.Match(p.Repo, repo)
	return ok
}

func (p Pin) matchTag(ns, repo, tag string) bool {
	if !p.matchRepo(ns, repo) {
		return false
	}
	if p.Tag == "" {
		return true
	}
	ok, _ := path.Match(p.Tag, tag)
	return ok
}

// splitKey splits a key's parts after its prefix byte.
func splitKey(k []byte) []string {
	return strings.Split(string(k[1:]), "\x00")
}

// pinned resolves the pins against the index: tags -> manifests (and
// their children) -> blobs.
func (s *Store) pinned() (map[digest.Digest]bool, error) {
	out := map[digest.Digest]bool{}
	if len(s.opt.Pins) == 0 {
		return out, nil
	}
	var roots []digest.Digest
	err := s.db.View(func(txn *badger.Txn) error {
		o := badger.DefaultIteratorOptions
		o.Prefix = []byte{prefixTag}
		it := txn.NewIterator(o)
		defer func() { it.Close() }()
		for it.Rewind(); it.Valid(); it.Next() {
			p := splitKey(it.Item().Key())
			if len(p) != 3 || !slices.ContainsFunc(s.opt.Pins, func(pin Pin) bool { return pin.matchTag(p[0], p[1], p[2]) }) {
				continue
			}
			err := it.Item().Value(func(v []byte) error {
				t, err := decodeTag(v)
				if err == nil {
					roots = append(roots, t.Digest)
				}
				return nil
			})
			if err != nil {
				return err
			}
		}
		it.Close()
		// Whole repositories and upstreams: everything they link.
		o.Prefix = []byte{prefixLink}
		o.PrefetchValues = false
		it = txn.NewIterator(o)
		for it.Rewind(); it.Valid(); it.Next() {
			p := splitKey(it.Item().Key())
			if len(p) == 3 && slices.ContainsFunc(s.opt.Pins, func(pin Pin) bool { return pin.Tag == "" && pin.matchRepo(p[0], p[1]) }) {
				out[digest.Digest(p[2])] = true
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.closeOver(roots, out)
	return out, nil
}

// closeOver adds roots and everything they reference (through stored
// manifests, recursively) to set.
func (s *Store) closeOver(roots []digest.Digest, set map[digest.Digest]bool) {
	seen := map[digest.Digest]bool{}
	for len(roots) > 0 {
		d := roots[len(roots)-1]
		roots = roots[:len(roots)-1]
		if seen[d] {
			continue
		}
		seen[d] = true
		set[d] = true
		m, err := s.GetManifest(d)
		if err != nil {
			continue
		}
		refs, err := ManifestReferences(m.Bytes)
		if err != nil {
			continue
		}
		roots = append(roots, refs...)
	}
}

// candidate is a blob eviction may remove.
type candidate struct {
	d    digest.Digest
	size int64
	at   int64 // last access, unix nanos
}

// newestFirst is a max-heap by access time: its top is the candidate to
// give up first when the set already frees enough.
type newestFirst []candidate

func (h newestFirst) Len() int           { return len(h) }
func (h newestFirst) Less(i, j int) bool { return h[i].at > h[j].at }
func (h newestFirst) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *newestFirst) Push(x any)        { *h = append(*h, x.(candidate)) }
func (h *newestFirst) Pop() any {
	old := *h
	c := old[len(old)-1]
	*h = old[:len(old)-1]
	return c
}

// planEviction picks the least recently used evictable blobs whose sizes
// add up to at least need: pulled, not pinned, not open by a reader. It
// scans the index once, merging 'b' and 'a' keys (both in digest order),
// and keeps only the chosen set in memory, oldest first.
func (s *Store) planEviction(need int64) ([]candidate, error) {
	if need <= 0 {
		return nil, nil
	}
	if err := s.flushAccess(); err != nil {
		return nil, err
	}
	pins, err := s.pinned()
	if err != nil {
		return nil, err
	}
	open := s.inUseSet()
	var h newestFirst
	var sum int64
	err = s.db.View(func(txn *badger.Txn) error {
		// Values are small and inline: read in place, no prefetching.
		o := badger.DefaultIteratorOptions
		o.Prefix = []byte{prefixBlob}
		o.PrefetchValues = false
		it := txn.NewIterator(o)
		defer func() { it.Close() }()
		ao := badger.DefaultIteratorOptions
		ao.Prefix = []byte{prefixAccess}
		ao.PrefetchValues = false
		at := txn.NewIterator(ao)
		defer at.Close()
		at.Rewind()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			name := item.Key()[1:]
			d := digest.Digest(name)
			var info BlobInfo
			if err := item.Value(func(v []byte) error {
				var err error
				info, err = decodeBlob(d, v)
				return err
			}); err != nil {
				continue
			}
			if info.Origin != OriginPulled || pins[d] || open[d] {
				continue
			}
			for at.Valid() && bytes.Compare(at.Item().Key()[1:], name) < 0 {
				at.Next()
			}
			var av []byte
			if at.Valid() && bytes.Equal(at.Item().Key()[1:], name) {
				av, _ = at.Item().ValueCopy(nil)
			}
			heap.Push(&h, candidate{d: digest.Digest(bytes.Clone(name)), size: info.Size, at: lastAccess(info.StoredAt.UnixNano(), av)})
			sum += info.Size
			for h.Len() > 0 && sum-h[0].size >= need {
				sum -= heap.Pop(&h).(candidate).size
			}
		}
		return nil
	})
	if errors.Is(err, badger.ErrDBClosed) {
		return nil, ErrClosed
	}
	slices.SortFunc(h, func(a, b candidate) int {
		switch {
		case a.at < b.at:
			return -1
		case a.at > b.at:
			return 1
		}
		return strings.Compare(string(a.d), string(b.d))
	})
	return h, err
}

// EvictReport says what an eviction pass did (or would do).
type EvictReport struct {
	Before int64         `json:"bytes_before"`
	Target int64         `json:"target_bytes"`
	Blobs  int           `json:"blobs"`
	Bytes  int64         `json:"bytes"`
	Dur    time.Duration `json:"duration_ns"`
}

// EvictToBudget runs an eviction pass if the blobs are past the high mark:
// least recently used first, down to the low mark. Without a budget it does
// nothing.
func (s *Store) EvictToBudget() (EvictReport, error) {
	if s.opt.MaxSize <= 0 || s.life.size.Load() <= s.highMark() {
		return EvictReport{}, nil
	}
	return s.Evict(s.lowMark(), false)
}

// Evict removes least recently used evictable blobs until the blobs take at
// most target bytes (or nothing evictable is left). dryRun only reports
// what it would remove.
func (s *Store) Evict(target int64, dryRun bool) (EvictReport, error) {
	s.life.pass.Lock()
	defer s.life.pass.Unlock()
	start := time.Now()
	r := EvictReport{Before: s.life.size.Load(), Target: target}
	plan, err := s.planEviction(r.Before - target)
	if err != nil {
		return r, err
	}
	for _, c := range plan {
		if dryRun {
			r.Blobs++
			r.Bytes += c.size
			continue
		}
		select {
		case <-s.stop:
			return r, ErrClosed
		default:
		}
		freed, ok, err := s.evictOne(c.d)
		if err != nil {
			return r, err
		}
		if ok {
			r.Blobs++
			r.Bytes += freed
		}
	}
	r.Dur = time.Since(start)
	if r.Blobs > 0 && !dryRun {
		s.life.evicted.Add(int64(r.Blobs))
		s.life.evictedBytes.Add(r.Bytes)
		s.log.Info("evicted", "blobs", r.Blobs, "bytes", r.Bytes, "dur", r.Dur, "size", s.life.size.Load(), "target", target)
	}
	return r, nil
}

// evictOne removes pulled blob d unless it became pushed or a reader opened
// it since the plan was made.
func (s *Store) evictOne(d digest.Digest) (int64, bool, error) {
	unlock := s.locks.Lock(string(d))
	defer unlock()
	if s.inUse(d) {
		return 0, false, nil
	}
	return s.deleteBlobLocked(d, func(info BlobInfo) bool { return info.Origin != OriginPulled })
}

// EvictPlan reports what the next eviction pass would do, removing
// nothing: nothing while the blobs are under the high mark.
func (s *Store) EvictPlan() (EvictReport, error) {
	if s.opt.MaxSize <= 0 || s.life.size.Load() <= s.highMark() {
		return EvictReport{Before: s.life.size.Load(), Target: s.lowMark()}, nil
	}
	return s.Evict(s.lowMark(), true)
}
