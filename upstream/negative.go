package upstream

import (
	"sync"
	"time"
)

// negativeCache remembers, for a short while, what an upstream said does
// not exist, so a storm of pulls for a missing image reaches the upstream
// once. It lives in memory: losing it on restart costs one request.
type negativeCache struct {
	ttl time.Duration
	now func() time.Time

	mu sync.Mutex
	m  map[string]time.Time // key -> expiry
}

const maxNegative = 10_000

func newNegativeCache(ttl time.Duration, now func() time.Time) *negativeCache {
	return &negativeCache{ttl: ttl, now: now, m: make(map[string]time.Time)}
}

func (n *negativeCache) add(key string) {
	if n.ttl <= 0 {
		return
	}
	now := n.now()
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.m) >= maxNegative {
		for k, exp := range n.m {
			if !now.Before(exp) {
				delete(n.m, k)
			}
		}
		if len(n.m) >= maxNegative {
			clear(n.m)
		}
	}
	n.m[key] = now.Add(n.ttl)
}

func (n *negativeCache) has(key string) bool {
	if n.ttl <= 0 {
		return false
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	exp, ok := n.m[key]
	if ok && !n.now().Before(exp) {
		delete(n.m, key)
		return false
	}
	return ok
}

func (n *negativeCache) forget(key string) {
	n.mu.Lock()
	delete(n.m, key)
	n.mu.Unlock()
}
