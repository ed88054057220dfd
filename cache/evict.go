package cache

import (
	"container/heap"
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

// pinned resolves the pins against the index from the top: tags ->
// manifests (and their children) -> blobs, and everything whole pinned
// repositories link. It is the plan's shortcut; pinnedNow, walking up from
// one digest, is what an eviction asks when it acts.
func (s *Store) pinned() (map[digest.Digest]bool, error) {
	out := map[digest.Digest]bool{}
	if len(s.opt.Pins) == 0 {
		return out, nil
	}
	var roots []digest.Digest
	err := s.ix.view(func(txn *badger.Txn) error {
		err := each(txn, keyAll(prefixTag), nil, false, func(item *badger.Item) error {
			ns, repo, tag, ok := parseTagKey(item.Key())
			if !ok || !slices.ContainsFunc(s.opt.Pins, func(p Pin) bool { return p.matchTag(ns, repo, tag) }) {
				return nil
			}
			return item.Value(func(v []byte) error {
				if t, err := decodeTag(v); err == nil {
					roots = append(roots, t.Digest)
				}
				return nil
			})
		})
		if err != nil {
			return err
		}
		return each(txn, keyAll(prefixLink), nil, false, func(item *badger.Item) error {
			ns, repo, d, ok := parseLinkKey(item.Key())
			if ok && slices.ContainsFunc(s.opt.Pins, func(p Pin) bool { return p.Tag == "" && p.matchRepo(ns, repo) }) {
				out[d] = true
			}
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	s.closeOver(roots, out)
	return out, nil
}

// closeOver adds roots and everything they hold (through stored
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
		held, _, err := References(m.Bytes)
		if err != nil {
			continue
		}
		for _, h := range held {
			roots = append(roots, h.Digest)
		}
	}
}

// candidate is a blob or manifest eviction may remove.
type candidate struct {
	d    digest.Digest
	k    kind
	size int64
	at   int64 // last use when planned, unix nanos
}

// newestFirst is a max-heap by last use: its top is the candidate to give
// up first when the set already frees enough.
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

// eachWithAccess calls fn for every 'b' or 'm' key (k) with its digest,
// item (value read in place) and access time in the index (0: none). Both
// key ranges are in digest order, so one merge walks them.
func eachWithAccess(txn *badger.Txn, k kind, fn func(d digest.Digest, item *badger.Item, access int64) error) error {
	at := newCursor(txn, keyAll(prefixAccess))
	defer at.close()
	return each(txn, keyAll(byte(k)), nil, false, func(item *badger.Item) error {
		var access int64
		at.valueAt(item.Key()[1:], func(v []byte) { access, _ = decodeTime(v) })
		return fn(digest.Digest(item.Key()[1:]), item, access)
	})
}

// planEviction picks the least recently used evictable blobs and
// manifests whose sizes add up to at least need: pulled, not pinned, not
// open by a reader. It scans the index once per kind and keeps only the
// chosen set in memory, oldest first.
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
	var h newestFirst
	var sum int64
	err = s.eachEvictable(pins, func(c candidate) {
		heap.Push(&h, c)
		sum += c.size
		for h.Len() > 0 && sum-h[0].size >= need {
			sum -= heap.Pop(&h).(candidate).size
		}
	})
	sortOldestFirst(h)
	return h, err
}

// sortOldestFirst sorts by last use, then digest.
func sortOldestFirst(cs []candidate) {
	slices.SortFunc(cs, func(a, b candidate) int {
		switch {
		case a.at < b.at:
			return -1
		case a.at > b.at:
			return 1
		}
		return strings.Compare(string(a.d), string(b.d))
	})
}

// eachEvictable calls fn with every blob and manifest eviction may
// remove, with its last use as far as known now (the index's and any
// still in memory): pulled content (any content in a fleet, whose shared
// tier keeps it), not pinned, and blobs no reader holds open.
func (s *Store) eachEvictable(pins map[digest.Digest]bool, fn func(candidate)) error {
	open := s.inUseSet()
	consider := func(c candidate) {
		c.at = max(c.at, s.pendingAccess(c.d))
		fn(c)
	}
	return s.ix.view(func(txn *badger.Txn) error {
		err := eachWithAccess(txn, kindBlob, func(d digest.Digest, item *badger.Item, access int64) error {
			var info BlobInfo
			if item.Value(func(v []byte) error {
				var err error
				info, err = decodeBlob(d, v)
				return err
			}) != nil || (info.Origin != OriginPulled && s.shared == nil) || pins[d] || open[d] {
				return nil
			}
			consider(candidate{d: d, k: kindBlob, size: info.Size, at: max(info.StoredAt.UnixNano(), access)})
			return nil
		})
		if err != nil {
			return err
		}
		return eachWithAccess(txn, kindManifest, func(d digest.Digest, item *badger.Item, access int64) error {
			var origin Origin
			var size int64
			if item.Value(func(v []byte) error {
				var err error
				origin, err = manifestOrigin(v)
				size = manifestSize(v)
				return err
			}) != nil || (origin != OriginPulled && s.shared == nil) || pins[d] {
				return nil
			}
			consider(candidate{d: d, k: kindManifest, size: size, at: access})
			return nil
		})
	})
}

// EvictReport says what an eviction pass did (or would do).
type EvictReport struct {
	Before    int64         `json:"bytes_before"`
	Target    int64         `json:"target_bytes"`
	Blobs     int           `json:"blobs"`
	Manifests int           `json:"manifests"`
	Bytes     int64         `json:"bytes"`
	Dur       time.Duration `json:"duration_ns"`
}

// EvictToBudget runs an eviction pass if the blobs and manifests are past
// the high mark: least recently used first, down to the low mark. Without
// a budget it does nothing. A pass already running (the maintenance loop
// starts one when a write passes the high mark) is waited for first, so
// that the store is within its budget when EvictToBudget returns, as far
// as evictable content allows.
func (s *Store) EvictToBudget() (EvictReport, error) {
	if s.opt.MaxSize <= 0 {
		return EvictReport{}, nil
	}
	s.life.pass.Lock()
	defer s.life.pass.Unlock()
	if s.life.total() <= s.highMark() {
		return EvictReport{}, nil
	}
	return s.evictLocked(s.lowMark(), false)
}

// Evict removes least recently used evictable blobs and manifests until
// they take at most target bytes (or nothing evictable is left). dryRun
// only reports what it would remove. Each removal asks the rule (see
// live.go) inside the digest's lock: what became pushed, was opened or was
// used since the plan stays.
func (s *Store) Evict(target int64, dryRun bool) (EvictReport, error) {
	s.life.pass.Lock()
	defer s.life.pass.Unlock()
	return s.evictLocked(target, dryRun)
}

func (s *Store) evictLocked(target int64, dryRun bool) (EvictReport, error) {
	start := time.Now()
	r := EvictReport{Before: s.life.total(), Target: target}
	plan, err := s.planEviction(r.Before - target)
	if err != nil {
		return r, err
	}
	for _, c := range plan {
		if dryRun {
			r.note(removed{kind: c.k, bytes: c.size})
			continue
		}
		select {
		case <-s.stop:
			return r, ErrClosed
		default:
		}
		rm, err := s.collect(c.d, c.k, func(txn *badger.Txn, origin Origin, stored int64) (string, error) {
			return s.keepForEviction(txn, c.d, c.k, origin, stored, c.at)
		}, true)
		if err != nil {
			return r, err
		}
		if rm.kind != 0 {
			r.note(rm)
		}
	}
	r.Dur = time.Since(start)
	if r.Blobs+r.Manifests > 0 && !dryRun {
		s.log.Info("evicted", "blobs", r.Blobs, "manifests", r.Manifests, "bytes", r.Bytes, "dur", r.Dur,
			"size", s.life.total(), "target", target)
	}
	return r, nil
}

func (r *EvictReport) note(rm removed) {
	if rm.kind == kindBlob {
		r.Blobs++
	} else {
		r.Manifests++
	}
	r.Bytes += rm.bytes
}

// EvictPlan reports what the next eviction pass would do, removing
// nothing: nothing while the store is under the high mark.
func (s *Store) EvictPlan() (EvictReport, error) {
	if s.opt.MaxSize <= 0 || s.life.total() <= s.highMark() {
		return EvictReport{Before: s.life.total(), Target: s.lowMark()}, nil
	}
	return s.Evict(s.lowMark(), true)
}
