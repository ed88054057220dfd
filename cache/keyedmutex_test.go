package cache

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func (k *keyedMutex) size() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.locks)
}

func (k *keyedMutex) refs(key string) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	if e := k.locks[key]; e != nil {
		return e.refs
	}
	return 0
}

// waitFor polls cond, bounded by a count and a deadline.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLong)
	for i := 0; i < 10000 && time.Now().Before(deadline); i++ {
		if cond() {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

func TestKeyedMutexExclusion(t *testing.T) {
	var k keyedMutex
	const (
		keys    = 8
		workers = 16
		rounds  = 200
	)
	// counters are plain ints: if two goroutines ever held one key at
	// once, -race reports it, and inside catches it without -race.
	var counters [keys]int
	var inside [keys]atomic.Int32
	var violations atomic.Int32
	var wg sync.WaitGroup
	start := make(chan struct{})
	for key := range keys {
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				name := fmt.Sprintf("sha256:%d", key)
				for range rounds {
					unlock := k.Lock(name)
					if inside[key].Add(1) != 1 {
						violations.Add(1)
					}
					counters[key]++
					inside[key].Add(-1)
					unlock()
				}
			}()
		}
	}
	close(start)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(waitLong):
		t.Fatal("workers did not finish")
	}
	if v := violations.Load(); v != 0 {
		t.Fatalf("%d times two goroutines held one key", v)
	}
	for key, n := range counters {
		if n != workers*rounds {
			t.Errorf("key %d: counter %d, want %d", key, n, workers*rounds)
		}
	}
	if n := k.size(); n != 0 {
		t.Fatalf("%d entries left in the map after all unlocks", n)
	}
}

func TestKeyedMutexKeysIndependent(t *testing.T) {
	var k keyedMutex
	unlockA := k.Lock("A")

	// Someone waiting for A must not hold anyone else up either.
	waiterA := make(chan struct{})
	go func() {
		unlock := k.Lock("A")
		close(waiterA)
		unlock()
	}()

	done := make(chan struct{})
	go func() {
		for range 100 {
			unlock := k.Lock("B")
			unlock()
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(waitLong):
		t.Fatal("locking B blocked while A was held")
	}
	select {
	case <-waiterA:
		t.Fatal("a second holder of A got in while A was held")
	default:
	}
	unlockA()
	select {
	case <-waiterA:
	case <-time.After(waitLong):
		t.Fatal("the waiter for A never got it")
	}
	waitFor(t, "the map to empty", func() bool { return k.size() == 0 })
}

func TestKeyedMutexSameKeyWaits(t *testing.T) {
	var k keyedMutex
	unlock := k.Lock("d")
	if got := k.refs("d"); got != 1 {
		t.Fatalf("refs = %d, want 1", got)
	}

	acquired := make(chan func())
	go func() { acquired <- k.Lock("d") }()
	// The waiter registers itself before blocking; once it has, it must
	// stay blocked until we unlock.
	waitFor(t, "the waiter to register", func() bool { return k.refs("d") == 2 })
	select {
	case <-acquired:
		t.Fatal("second Lock of a held key returned")
	case <-time.After(quiet):
	}

	unlock()
	var unlock2 func()
	select {
	case unlock2 = <-acquired:
	case <-time.After(waitLong):
		t.Fatal("waiter did not get the lock after unlock")
	}
	// Its entry is still there while it is held.
	if got := k.refs("d"); got != 1 {
		t.Fatalf("refs while the waiter holds it = %d, want 1", got)
	}
	unlock2()
	if n := k.size(); n != 0 {
		t.Fatalf("%d entries left in the map", n)
	}
	// The key is usable again after its entry was dropped.
	k.Lock("d")()
	if n := k.size(); n != 0 {
		t.Fatalf("%d entries left in the map", n)
	}
}

func TestKeyedMutexZeroValueAndManyKeys(t *testing.T) {
	var k keyedMutex
	unlocks := make([]func(), 0, 1000)
	for i := range 1000 {
		unlocks = append(unlocks, k.Lock(fmt.Sprint(i)))
	}
	unlocks = append(unlocks, k.Lock("")) // the empty key is a key
	if n := k.size(); n != 1001 {
		t.Fatalf("map holds %d entries, want 1001", n)
	}
	for _, u := range unlocks {
		u()
	}
	if n := k.size(); n != 0 {
		t.Fatalf("%d entries left in the map", n)
	}
}
