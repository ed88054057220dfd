package cache

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
)

// What memory answers for a tag or a repository is what the index holds,
// right after every kind of write that changes it.
func TestHotKeysFollowEveryWrite(t *testing.T) {
	s, _ := newStore(t)
	const ns, repo = "up.example", "team/app"
	m1, m2 := hotTestManifest(1, OriginPulled), hotTestManifest(2, OriginPulled)
	for _, m := range []Manifest{m1, m2} {
		if err := s.PutManifest(ManifestPut{NS: ns, Repo: repo, Manifest: m}); err != nil {
			t.Fatal(err)
		}
	}
	tagIs := func(step string, want Manifest) {
		t.Helper()
		for i := 0; i < 2; i++ { // the second answer from memory
			got, err := s.GetTag(ns, repo, "v1")
			if want.Digest == "" {
				if !errors.Is(err, ErrNotFound) {
					t.Fatalf("%s: tag reads as %v, %v; want none", step, got.Digest, err)
				}
				continue
			}
			if err != nil || got.Digest != want.Digest {
				t.Fatalf("%s: tag reads as %v, %v; want %v", step, got.Digest, err, want.Digest)
			}
		}
	}
	tagIs("never set", Manifest{})
	if err := s.SetTag(ns, repo, "v1", Tag{Digest: m1.Digest, FetchedAt: s.now()}); err != nil {
		t.Fatal(err)
	}
	tagIs("set", m1)
	if err := s.SetTag(ns, repo, "v1", Tag{Digest: m2.Digest, FetchedAt: s.now()}); err != nil {
		t.Fatal(err)
	}
	tagIs("moved", m2)
	if err := s.PutManifest(ManifestPut{NS: ns, Repo: repo, Manifest: m1, Tags: []string{"v1"}}); err != nil {
		t.Fatal(err)
	}
	tagIs("moved by a manifest put", m1)
	if err := s.DeleteTag(ns, repo, "v1"); err != nil {
		t.Fatal(err)
	}
	tagIs("deleted", Manifest{})
	if err := s.SetTag(ns, repo, "v1", Tag{Digest: m2.Digest, FetchedAt: s.now()}); err != nil {
		t.Fatal(err)
	}
	tagIs("set again", m2)
	if _, err := s.RemoveFromRepository(ns, repo, m2.Digest); err != nil {
		t.Fatal(err)
	}
	tagIs("its manifest removed from the repository", Manifest{})

	// FetchedAt is what the index holds too: revalidation moves it.
	at := s.now()
	if err := s.SetTag(ns, repo, "v2", Tag{Digest: m1.Digest, FetchedAt: at}); err != nil {
		t.Fatal(err)
	}
	s.GetTag(ns, repo, "v2")
	later := at.Add(42)
	if err := s.SetTag(ns, repo, "v2", Tag{Digest: m1.Digest, FetchedAt: later}); err != nil {
		t.Fatal(err)
	}
	if got, err := s.GetTag(ns, repo, "v2"); err != nil || !got.FetchedAt.Equal(later) {
		t.Fatalf("revalidated tag reads as fetched at %v, %v; want %v", got.FetchedAt, err, later)
	}

	for i := 0; i < 2; i++ {
		if ok, err := s.RepositoryExists("local/app"); ok || err != nil {
			t.Fatalf("a repository never added exists: %v", err)
		}
	}
	if err := s.AddRepository("local/app"); err != nil {
		t.Fatal(err)
	}
	if ok, err := s.RepositoryExists("local/app"); !ok || err != nil {
		t.Fatalf("an added repository does not exist: %v", err)
	}
}

// Readers and writers of tags at once: a writer reads back what it wrote
// (nothing in memory hides it), and at the end memory and index agree.
func TestHotKeysConcurrent(t *testing.T) {
	s, _ := newStore(t)
	const ns, repo = "up.example", "team/app"
	var ms []Manifest
	for i := 0; i < 4; i++ {
		m := hotTestManifest(i, OriginPulled)
		if err := s.PutManifest(ManifestPut{NS: ns, Repo: repo, Manifest: m}); err != nil {
			t.Fatal(err)
		}
		ms = append(ms, m)
	}
	tags := []string{"a", "b", "c"}
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 200; i++ {
				tag := tags[(i+w)%len(tags)]
				if w%2 == 1 {
					if _, err := s.GetTag(ns, repo, tag); err != nil && !errors.Is(err, ErrNotFound) {
						t.Error(err)
						return
					}
					s.RepositoryExists(fmt.Sprintf("r%d", i%5))
					continue
				}
				// Each writer has a tag of its own, read back at once.
				own := fmt.Sprintf("w%d", w)
				m := ms[(i+w)%len(ms)]
				if err := s.SetTag(ns, repo, own, Tag{Digest: m.Digest, FetchedAt: s.now()}); err != nil {
					t.Error(err)
					return
				}
				if got, err := s.GetTag(ns, repo, own); err != nil || got.Digest != m.Digest {
					t.Errorf("writer %d set %s to %s, reads %s (%v)", w, own, m.Digest, got.Digest, err)
					return
				}
				if i%3 == 0 {
					if err := s.DeleteTag(ns, repo, tag); err != nil && !errors.Is(err, ErrNotFound) {
						t.Error(err)
						return
					}
				} else if err := s.SetTag(ns, repo, tag, Tag{Digest: m.Digest, FetchedAt: s.now()}); err != nil {
					t.Error(err)
					return
				}
				if i%50 == 0 {
					if err := s.AddRepository(fmt.Sprintf("r%d", i%5)); err != nil {
						t.Error(err)
						return
					}
					if ok, _ := s.RepositoryExists(fmt.Sprintf("r%d", i%5)); !ok {
						t.Errorf("writer %d added r%d, it does not exist", w, i%5)
					}
				}
			}
		}()
	}
	wg.Wait()
	for _, tag := range tags {
		got, err := s.GetTag(ns, repo, tag)
		v, ierr := s.ix.get(keyTag(ns, repo, tag))
		if errors.Is(ierr, ErrNotFound) {
			if !errors.Is(err, ErrNotFound) {
				t.Errorf("%s: memory says %s, the index has none", tag, got.Digest)
			}
			continue
		}
		want, _ := decodeTag(v)
		if err != nil || got != want {
			t.Errorf("%s: memory says %+v (%v), the index %+v", tag, got, err, want)
		}
	}
}

// A read that began before a write and ends after it is not served later.
func TestHotKeysReadRacingWriteIsNotKept(t *testing.T) {
	var writes atomic.Uint64
	h := hotKeys[string, int]{writes: &writes, max: 8}
	v, _ := h.get("k", func() (int, error) {
		writes.Add(1) // a write commits while the index is read
		return 1, nil
	})
	if v != 1 {
		t.Fatalf("read %d", v)
	}
	if v, _ := h.get("k", func() (int, error) { return 2, nil }); v != 2 {
		t.Errorf("a value read across a write is served: %d", v)
	}
	if v, _ := h.get("k", func() (int, error) { return 3, nil }); v != 2 {
		t.Errorf("a value read with no write since is read again: %d", v)
	}
	if _, err := h.get("e", func() (int, error) { return 0, ErrNotFound }); !errors.Is(err, ErrNotFound) {
		t.Errorf("error: %v", err)
	}
	if v, _ := h.get("e", func() (int, error) { return 4, nil }); v != 4 {
		t.Errorf("an error is kept: %d", v)
	}
}

// However many keys are read, at most max are held.
func TestHotKeysBounded(t *testing.T) {
	var writes atomic.Uint64
	h := hotKeys[string, int]{writes: &writes, max: 16}
	for i := range 1000 {
		h.get(fmt.Sprint(i), func() (int, error) { return i, nil })
	}
	if n := h.len(); n > 16 {
		t.Errorf("%d keys held, max 16", n)
	}
	if v, _ := h.get("999", func() (int, error) { return -1, nil }); v != 999 {
		t.Errorf("the key read last is not held: %d", v)
	}
}

func (h *hotKeys[K, V]) len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.lru == nil {
		return 0
	}
	return h.lru.Len()
}

// BenchmarkHotTagsGet: warm reads of tags from many goroutines, as warm
// pulls by tag do them, with no write to the index in between.
func BenchmarkHotTagsGet(b *testing.B) {
	dir := b.TempDir()
	s, err := Open(dir, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	const ns = "up.example"
	var repos []string
	for i := range 64 {
		m := hotTestManifest(i, OriginPulled)
		repo := fmt.Sprintf("team/app%d", i)
		if err := s.PutManifest(ManifestPut{NS: ns, Repo: repo, Manifest: m, Tags: []string{"v1"}}); err != nil {
			b.Fatal(err)
		}
		repos = append(repos, repo)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if _, err := s.GetTag(ns, repos[i%len(repos)], "v1"); err != nil {
				b.Error(err)
				return
			}
			i += 7
		}
	})
}
