package upstream

import (
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// negativeCache remembers, for a short while, what an upstream said does
// not exist, so a storm of pulls for a missing image reaches the upstream
// once. It lives in memory: losing it on restart costs one request.
//
// It holds at most maxNegative names, least recently asked for first out
// (golang-lru's simplelru, under mu): a flood of distinct bogus names
// pushes out old names one at a time, never the ones still being asked
// for. An entry expires ttl after the upstream said 404, however often it
// is hit since; an expired one is dropped when met.
type negativeCache struct {
	ttl time.Duration
	now func() time.Time

	mu  sync.Mutex
	lru *simplelru.LRU[string, time.Time] // key -> expiry
}

const maxNegative = 10_000

func newNegativeCache(ttl time.Duration, now func() time.Time) *negativeCache {
	l, err := simplelru.NewLRU[string, time.Time](maxNegative, nil)
	if err != nil {
		panic(err) // only for a size <= 0
	}
	return &negativeCache{ttl: ttl, now: now, lru: l}
}

func (n *negativeCache) add(key string) {
	if n.ttl <= 0 {
		return
	}
	exp := n.now().Add(n.ttl)
	n.mu.Lock()
	n.lru.Add(key, exp)
	n.mu.Unlock()
}

func (n *negativeCache) has(key string) bool {
	if n.ttl <= 0 {
		return false
	}
	now := n.now()
	n.mu.Lock()
	defer n.mu.Unlock()
	exp, ok := n.lru.Get(key)
	if ok && !now.Before(exp) {
		n.lru.Remove(key)
		return false
	}
	return ok
}

func (n *negativeCache) forget(key string) {
	n.mu.Lock()
	n.lru.Remove(key)
	n.mu.Unlock()
}
