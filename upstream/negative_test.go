package upstream

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeClock is a time that moves only when told.
type fakeClock struct{ ns atomic.Int64 }

func (c *fakeClock) now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) advance(d time.Duration) { c.ns.Add(int64(d)) }

func (n *negativeCache) size() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.lru.Len()
}

func TestNegativeCacheExpires(t *testing.T) {
	clk := &fakeClock{}
	clk.advance(time.Hour)
	n := newNegativeCache(15*time.Second, clk.now)
	n.add("a")
	clk.advance(14 * time.Second)
	if !n.has("a") {
		t.Fatal("a 404 is forgotten before its TTL")
	}
	n.add("b")
	clk.advance(time.Second) // a: 15 s old; hits did not extend it
	if n.has("a") {
		t.Error("a 404 is remembered past its TTL")
	}
	if !n.has("b") {
		t.Error("a later 404 expired with an earlier one")
	}
	if n.size() != 1 {
		t.Errorf("%d names held, want 1 (the expired one dropped when met)", n.size())
	}
	n.forget("b")
	if n.has("b") {
		t.Error("a forgotten name is still remembered")
	}
	off := newNegativeCache(-1, clk.now)
	off.add("a")
	if off.has("a") || off.size() != 0 {
		t.Error("a negative TTL remembers 404s")
	}
}

// A flood of distinct bogus names, far past the limit, keeps the cache at
// its limit and pushes out only names nobody asks for: the names that are
// being asked for during the flood stay, and so keep protecting the
// upstream.
func TestNegativeCacheFloodKeepsNamesInUse(t *testing.T) {
	clk := &fakeClock{}
	n := newNegativeCache(time.Hour, clk.now)
	hot := []string{"library/missing:1", "team/gone:v2", "blobs/sha256:dead"}
	for _, k := range hot {
		n.add(k)
	}
	n.add("cold/first")
	for i := range 3 * maxNegative {
		n.add(fmt.Sprintf("bogus/%d:x", i))
		if i%(maxNegative/4) == 0 {
			for _, k := range hot {
				if !n.has(k) {
					t.Fatalf("after %d bogus names: %s, asked for all along, was dropped", i+1, k)
				}
			}
		}
		if s := n.size(); s > maxNegative {
			t.Fatalf("after %d bogus names: %d held, limit %d", i+1, s, maxNegative)
		}
	}
	for _, k := range hot {
		if !n.has(k) {
			t.Errorf("%s, asked for all along, was dropped by the flood", k)
		}
	}
	if n.has("cold/first") || n.has("bogus/0:x") {
		t.Error("the least recently used names were kept past the limit")
	}
	if !n.has(fmt.Sprintf("bogus/%d:x", 3*maxNegative-1)) {
		t.Error("the newest name is not held")
	}
	if s := n.size(); s != maxNegative {
		t.Errorf("%d held after the flood, want the limit %d", s, maxNegative)
	}
}

func TestNegativeCacheConcurrent(t *testing.T) {
	clk := &fakeClock{}
	n := newNegativeCache(time.Second, clk.now)
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := range 5000 {
				k := fmt.Sprintf("%d/%d", w, i%3000)
				switch i % 4 {
				case 0, 1:
					n.add(k)
				case 2:
					n.has(k)
				case 3:
					if w == 0 {
						clk.advance(time.Millisecond)
					}
					n.forget(k)
				}
			}
		})
	}
	wg.Wait()
	if s := n.size(); s > maxNegative {
		t.Errorf("%d held, limit %d", s, maxNegative)
	}
}
