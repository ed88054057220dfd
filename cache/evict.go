package cache

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/hex"
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

// candidate is a blob or manifest eviction may remove. A sha256 digest
// (every digest, in practice) is held as its 32 bytes, so that a plan
// allocates nothing per index entry it looks at and the garbage collector
// has no string to follow per candidate; any other digest is held as it is.
type candidate struct {
	at    int64 // last use when planned, unix nanos
	size  int64
	sum   [sha256.Size]byte
	other digest.Digest // a digest that is not sha256 ("" for sha256)
	k     kind
}

// newCandidate makes a candidate of name, a digest as its key holds it.
func newCandidate(name []byte, k kind, size, at int64) candidate {
	c := candidate{at: at, size: size, k: k}
	h, ok := bytes.CutPrefix(name, []byte("sha256:"))
	if ok && len(h) == 2*sha256.Size && !bytes.ContainsAny(h, "ABCDEF") {
		if _, err := hex.Decode(c.sum[:], h); err == nil {
			return c
		}
	}
	c.other = digest.Digest(name)
	return c
}

func (c candidate) digest() digest.Digest {
	if c.other != "" {
		return c.other
	}
	return digest.NewDigestFromEncoded(digest.SHA256, hex.EncodeToString(c.sum[:]))
}

// compare orders candidates by last use, then digest.
func (c candidate) compare(o candidate) int {
	if r := cmp.Compare(c.at, o.at); r != 0 {
		return r
	}
	if c.other == "" && o.other == "" {
		return bytes.Compare(c.sum[:], o.sum[:]) // the order of their hex
	}
	return strings.Compare(string(c.digest()), string(o.digest()))
}

// planMax bounds the candidates one plan holds (72 bytes each: 9 MiB). A
// pass that must remove more plans again, after where its last plan ended.
const planMax = 1 << 17

// selection keeps, of the candidates offered to it, the least recently
// used ones whose sizes add up to at least need, at most max of them, and
// only those after after (if set). It is a heap whose top is the newest it
// keeps: the first to give up when it holds more than it needs.
type selection struct {
	need  int64
	max   int
	after *candidate
	sum   int64
	h     []candidate
}

// offer considers a candidate, and builds it only if it may stay.
func (s *selection) offer(name []byte, k kind, size, at int64) {
	if s.after != nil && at < s.after.at || s.full() && at > s.h[0].at {
		return
	}
	c := newCandidate(name, k, size, at)
	if s.after != nil && c.compare(*s.after) <= 0 || s.full() && c.compare(s.h[0]) > 0 {
		return
	}
	s.push(c)
	for len(s.h) > 0 && (len(s.h) > s.max || s.sum-s.h[0].size >= s.need) {
		s.pop()
	}
}

// full reports whether a candidate newer than every one kept would be
// given up at once: enough bytes, or as many as it may hold.
func (s *selection) full() bool {
	return len(s.h) > 0 && (s.sum >= s.need || len(s.h) >= s.max)
}

// cut reports whether the bound, not the need, ended the selection.
func (s *selection) cut() bool { return len(s.h) >= s.max && s.sum < s.need }

func (s *selection) push(c candidate) {
	s.sum += c.size
	s.h = append(s.h, c)
	for i := len(s.h) - 1; i > 0; {
		p := (i - 1) / 2
		if s.h[i].compare(s.h[p]) <= 0 {
			break
		}
		s.h[i], s.h[p] = s.h[p], s.h[i]
		i = p
	}
}

func (s *selection) pop() {
	n := len(s.h) - 1
	s.sum -= s.h[0].size
	s.h[0] = s.h[n]
	s.h = s.h[:n]
	for i := 0; ; {
		j := 2*i + 1
		if j >= n {
			break
		}
		if r := j + 1; r < n && s.h[r].compare(s.h[j]) > 0 {
			j = r
		}
		if s.h[j].compare(s.h[i]) <= 0 {
			break
		}
		s.h[i], s.h[j] = s.h[j], s.h[i]
		i = j
	}
}

// oldestFirst is what it kept, least recently used first.
func (s *selection) oldestFirst() []candidate {
	slices.SortFunc(s.h, candidate.compare)
	return s.h
}

// eachWithAccess calls fn for every 'b' or 'm' key (k) with its digest as
// the key holds it, item (value read in place) and access time in the
// index (0: none); name and item are valid only during fn. Both key ranges
// are in digest order, so one merge walks them.
func eachWithAccess(txn *badger.Txn, k kind, fn func(name []byte, item *badger.Item, access int64) error) error {
	at := newCursor(txn, keyAll(prefixAccess))
	defer at.close()
	return each(txn, keyAll(byte(k)), nil, false, func(item *badger.Item) error {
		var access int64
		name := item.Key()[1:]
		at.valueAt(name, func(v []byte) { access, _ = decodeTime(v) })
		return fn(name, item, access)
	})
}

// planEviction picks the least recently used evictable blobs and
// manifests whose sizes add up to at least need, after after (nil: from
// the oldest): pulled, not pinned, not open by a reader. It scans the
// index once per kind and keeps only the chosen set in memory, at most
// planMax of them, oldest first; cut says the bound ended it short of
// need.
func (s *Store) planEviction(need int64, after *candidate) (plan []candidate, cut bool, err error) {
	if err := s.flushAccess(); err != nil {
		return nil, false, err
	}
	pins, err := s.pinned()
	if err != nil {
		return nil, false, err
	}
	sel := selection{need: need, max: s.life.planMax, after: after}
	if err := s.eachEvictable(pins, sel.offer); err != nil {
		return nil, false, err
	}
	return sel.oldestFirst(), sel.cut(), nil
}

// eachEvictable calls fn with every blob and manifest eviction may
// remove (its digest as its key holds it, valid only during fn), with its
// last use as far as known now (the index's and any still in memory):
// pulled content (any content in a fleet, whose shared tier keeps it), not
// pinned, and blobs no reader holds open.
func (s *Store) eachEvictable(pins map[digest.Digest]bool, fn func(name []byte, k kind, size, at int64)) error {
	open := s.inUseSet()
	return s.ix.view(func(txn *badger.Txn) error {
		err := eachWithAccess(txn, kindBlob, func(name []byte, item *badger.Item, access int64) error {
			var info BlobInfo
			if item.Value(func(v []byte) error {
				var err error
				info, err = decodeBlob("", v)
				return err
			}) != nil || (info.Origin != OriginPulled && s.shared == nil) || pins[digest.Digest(name)] || open[digest.Digest(name)] {
				return nil
			}
			fn(name, kindBlob, info.Size, max(info.StoredAt.UnixNano(), access, s.pendingAccessOf(name)))
			return nil
		})
		if err != nil {
			return err
		}
		return eachWithAccess(txn, kindManifest, func(name []byte, item *badger.Item, access int64) error {
			var origin Origin
			var size int64
			if item.Value(func(v []byte) error {
				var err error
				origin, err = manifestOrigin(v)
				size = manifestSize(v)
				return err
			}) != nil || (origin != OriginPulled && s.shared == nil) || pins[digest.Digest(name)] {
				return nil
			}
			fn(name, kindManifest, size, max(access, s.pendingAccessOf(name)))
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
	// Planned is when the pass planned what it reports; zero when it had
	// nothing to plan (see EvictPlan).
	Planned time.Time `json:"planned_at,omitzero"`
}

// EvictToBudget runs an eviction pass if the blobs and manifests are past
// the high mark: least recently used first, down to the low mark. Without
// a budget it does nothing. A pass already running (the maintenance loop
// starts one when a write passes the high mark) is waited for first, so
// that the store is within its budget when EvictToBudget returns, as far
// as evictable content allows. What it plans is what EvictPlan reports.
func (s *Store) EvictToBudget() (EvictReport, error) {
	if s.opt.MaxSize <= 0 {
		return EvictReport{}, nil
	}
	s.life.pass.Lock()
	defer s.life.pass.Unlock()
	if s.life.total() <= s.highMark() {
		return EvictReport{}, nil
	}
	return s.evictLocked(s.lowMark(), false, true)
}

// Evict removes least recently used evictable blobs and manifests until
// they take at most target bytes (or nothing evictable is left). dryRun
// only reports what it would remove. Each removal asks the rule (see
// live.go) inside the digest's lock: what became pushed, was opened or was
// used since the plan stays.
func (s *Store) Evict(target int64, dryRun bool) (EvictReport, error) {
	s.life.pass.Lock()
	defer s.life.pass.Unlock()
	return s.evictLocked(target, dryRun, false)
}

// evictLocked plans and acts in rounds of at most planMax candidates
// (one, unless the pass must remove more), each round after where the
// last one's plan ended. record: what it plans is the budget's plan, for
// EvictPlan.
func (s *Store) evictLocked(target int64, dryRun, record bool) (EvictReport, error) {
	start := time.Now()
	r := EvictReport{Before: s.life.total(), Target: target}
	planned := EvictReport{Before: r.Before, Target: target}
	need := r.Before - target
	var after *candidate
	for need > 0 {
		plan, cut, err := s.planEviction(need, after)
		if err != nil {
			return r, err
		}
		if r.Planned.IsZero() {
			r.Planned = s.now()
			planned.Planned = r.Planned
		}
		for _, c := range plan {
			planned.note(removed{kind: c.k, bytes: c.size})
		}
		if record {
			planned.Dur = time.Since(start)
			p := planned
			s.life.plan.Store(&p)
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
			d := c.digest()
			rm, err := s.collect(d, c.k, func(txn *badger.Txn, origin Origin, stored int64) (string, error) {
				return s.keepForEviction(txn, d, c.k, origin, stored, c.at)
			}, true)
			if err != nil {
				return r, err
			}
			if rm.kind != 0 {
				r.note(rm)
			}
		}
		if !cut {
			break
		}
		after = &plan[len(plan)-1]
		if dryRun {
			need = r.Before - target - r.Bytes
		} else {
			need = s.life.total() - target
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

// EvictPlan reports what the next eviction pass would do. It reads no
// index and waits for no pass, so stats can ask it as often as they like:
// at or under the high mark, nothing; past it, what the last pass toward
// the budget planned, and when (Planned). The maintenance loop starts that
// pass as soon as a write crosses the high mark, and again every
// MaintenanceInterval while the store stays past it, so the plan is the
// pass running now or the one that ended last; before any pass planned,
// nothing, with Planned zero.
func (s *Store) EvictPlan() EvictReport {
	now := EvictReport{Before: s.life.total(), Target: s.lowMark()}
	if s.opt.MaxSize <= 0 || now.Before <= s.highMark() {
		return now
	}
	if p := s.life.plan.Load(); p != nil {
		return *p
	}
	return now
}
