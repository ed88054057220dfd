package cache

import (
	"sync"
	"sync/atomic"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"github.com/opencontainers/go-digest"
)

// hotManifests keeps the manifests read last in memory. A manifest's bytes
// cannot change under its digest, so a warm pull by tag costs one small
// index read (the tag) instead of two, and no copy of the manifest out of
// badger: at tens of thousands of requests a second that copy was the
// server's main source of garbage, and so of its tail latency.
//
// A least-recently-used list (golang-lru's simplelru, under mu) bounded by
// bytes: each entry costs its manifest's bytes plus hotEntryOverhead (so a
// flood of tiny manifests cannot hold millions of entries), and past the
// budget the least recently used entries go, one at a time. Every write
// bumps gen, and a read that raced a write does not cache what it read (so
// a pushed manifest's origin is never rolled back).
type hotManifests struct {
	mu    sync.Mutex
	lru   *simplelru.LRU[digest.Digest, Manifest] // nil until the first add
	bytes int                                     // what the entries cost
	gen   uint64
	max   int // bytes; 0: hotManifestBytes (tests make it small)
}

const (
	hotManifestBytes = 16 << 20
	// hotEntryOverhead is what an entry costs beyond its bytes: the map
	// slot, the list element and the Manifest, roughly.
	hotEntryOverhead = 256
)

func (h *hotManifests) get(d digest.Digest) (Manifest, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.lru == nil {
		return Manifest{}, false
	}
	return h.lru.Get(d)
}

// generation is taken before reading the index; add after it.
func (h *hotManifests) generation() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.gen
}

// add caches m, read from the index, unless a write came in meanwhile.
func (h *hotManifests) add(m Manifest, gen uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if gen == h.gen {
		h.addLocked(m)
	}
}

// wrote records a write of m to the index.
func (h *hotManifests) wrote(m Manifest) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.gen++
	if h.lru != nil {
		h.lru.Remove(m.Digest)
	}
	h.addLocked(m)
}

func hotCost(m Manifest) int { return len(m.Bytes) + hotEntryOverhead }

func (h *hotManifests) addLocked(m Manifest) {
	budget := h.max
	if budget == 0 {
		budget = hotManifestBytes
	}
	if len(m.Bytes) > budget/8 {
		return // a rare giant: read it from the index
	}
	if h.lru == nil {
		// Every entry costs at least hotEntryOverhead, so the count
		// bound is never the one that evicts.
		l, err := simplelru.NewLRU(budget/hotEntryOverhead+1, func(_ digest.Digest, old Manifest) {
			h.bytes -= hotCost(old)
		})
		if err != nil {
			panic(err) // only for a size <= 0
		}
		h.lru = l
	}
	if _, ok := h.lru.Get(m.Digest); ok {
		return // the same bytes, and no write since it was cached
	}
	h.lru.Add(m.Digest, m)
	h.bytes += hotCost(m)
	for h.bytes > budget {
		h.lru.RemoveOldest()
	}
}

// forget drops d, removed from the index.
func (h *hotManifests) forget(d digest.Digest) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.gen++
	if h.lru != nil {
		h.lru.Remove(d)
	}
}

// hotKeys keeps index entries read lately in memory, decoded, each with
// the index's write count at the moment it was read (index.writes, bumped
// after every read-write transaction and batch). An entry answers only
// while that count has not moved, so any write retires everything read
// before it without knowing which keys it touched: a tag moved in a
// transaction deep in eviction is never served from memory. A read that
// raced a write is stamped with the count before it, so it is never
// served either.
//
// A warm mirror's reads far outnumber its writes (fills, pushes, tag
// revalidations, the access-time flush every MaintenanceInterval), so most
// lookups answer from memory: a warm pull by tag no longer opens two
// badger transactions (the tag, and whether the name is a local
// repository). Under a stream of writes a lookup costs one failed map
// probe more than badger alone. At most max entries, least recently used
// first out; errors (ErrNotFound) are not kept.
type hotKeys[K comparable, V any] struct {
	writes *atomic.Uint64 // the index's
	max    int

	mu  sync.Mutex
	lru *simplelru.LRU[K, hotKey[V]] // nil until the first add
}

type hotKey[V any] struct {
	v  V
	at uint64 // index.writes when it was read
}

// Bounds of the hot keys: keys are at most a host, a name and a tag, so
// a few MiB at worst.
const (
	hotTags  = 4096
	hotRepos = 4096
)

// get returns k's value: from memory if the index was not written since it
// was read, else from read (which reads the index), kept if it succeeds.
func (h *hotKeys[K, V]) get(k K, read func() (V, error)) (V, error) {
	at := h.writes.Load()
	h.mu.Lock()
	var e hotKey[V]
	ok := false
	if h.lru != nil {
		e, ok = h.lru.Get(k)
	}
	h.mu.Unlock()
	if ok && e.at == at {
		return e.v, nil
	}
	v, err := read()
	if err != nil {
		return v, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.lru == nil {
		l, err := simplelru.NewLRU[K, hotKey[V]](h.max, nil)
		if err != nil {
			panic(err) // only for a size <= 0
		}
		h.lru = l
	}
	h.lru.Add(k, hotKey[V]{v: v, at: at})
	return v, nil
}
