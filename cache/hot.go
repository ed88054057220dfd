package cache

import (
	"sync"

	"github.com/opencontainers/go-digest"
)

// hotManifests keeps the manifests read last in memory. A manifest's bytes
// cannot change under its digest, so a warm pull by tag costs one small
// index read (the tag) instead of two, and no copy of the manifest out of
// badger: at tens of thousands of requests a second that copy was the
// server's main source of garbage, and so of its tail latency.
//
// Two generations, each up to half of hotManifestBytes: a hit in the older
// one moves the entry to the newer; when the newer is full, the older is
// dropped. Every write bumps gen, and a read that raced a write does not
// cache what it read (so a pushed manifest's origin is never rolled back).
type hotManifests struct {
	mu        sync.Mutex
	cur, prev map[digest.Digest]Manifest
	curBytes  int
	gen       uint64
	max       int // bytes; 0: hotManifestBytes (tests make it small)
}

const hotManifestBytes = 16 << 20

func (h *hotManifests) get(d digest.Digest) (Manifest, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if m, ok := h.cur[d]; ok {
		return m, true
	}
	m, ok := h.prev[d]
	if ok {
		delete(h.prev, d)
		h.addLocked(m)
	}
	return m, ok
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
	h.dropLocked(m.Digest)
	h.addLocked(m)
}

func (h *hotManifests) dropLocked(d digest.Digest) {
	delete(h.prev, d)
	if old, ok := h.cur[d]; ok {
		h.curBytes -= len(old.Bytes)
		delete(h.cur, d)
	}
}

func (h *hotManifests) addLocked(m Manifest) {
	budget := h.max
	if budget == 0 {
		budget = hotManifestBytes
	}
	if len(m.Bytes) > budget/8 {
		return // a rare giant: read it from the index
	}
	if h.curBytes+len(m.Bytes) > budget/2 || h.cur == nil {
		h.prev, h.cur, h.curBytes = h.cur, map[digest.Digest]Manifest{}, 0
	}
	if _, ok := h.cur[m.Digest]; !ok {
		h.cur[m.Digest] = m
		h.curBytes += len(m.Bytes)
	}
}

// forget drops d, removed from the index.
func (h *hotManifests) forget(d digest.Digest) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.gen++
	h.dropLocked(d)
}
