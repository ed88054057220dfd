package cache

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"
)

func hotTestManifest(i int, origin Origin) Manifest {
	b := []byte(fmt.Sprintf(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","n":%d,"pad":%q}`, i, bytes.Repeat([]byte("x"), 2000)))
	return Manifest{Digest: digest.FromBytes(b), MediaType: "application/vnd.oci.image.manifest.v1+json", Bytes: b, Origin: origin}
}

func TestHotManifestsServeWhatTheIndexHolds(t *testing.T) {
	s, _ := newStore(t)
	m := hotTestManifest(1, OriginPulled)
	if err := s.PutManifest(ManifestPut{Manifest: m}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		got, err := s.GetManifest(m.Digest)
		if err != nil || !bytes.Equal(got.Bytes, m.Bytes) || got.Origin != OriginPulled || got.MediaType != m.MediaType {
			t.Fatalf("read %d: %+v, %v", i, got.Origin, err)
		}
	}
	if _, ok := s.hot.get(m.Digest); !ok {
		t.Error("a manifest read twice is not held in memory")
	}
	// A push of the same manifest makes it pushed, in memory too.
	m.Origin = OriginPushed
	if err := s.PutManifest(ManifestPut{Manifest: m}); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.GetManifest(m.Digest); got.Origin != OriginPushed {
		t.Errorf("after a push the manifest reads as %v", got.Origin)
	}
	if _, err := s.GetManifest(digest.FromString("absent")); err == nil {
		t.Error("an absent manifest was found")
	}
}

func TestHotManifestsRacingReadDoesNotRollBack(t *testing.T) {
	var h hotManifests
	pulled := hotTestManifest(1, OriginPulled)
	gen := h.generation() // a reader starts reading the index...
	pushed := pulled
	pushed.Origin = OriginPushed
	h.wrote(pushed)    // ...a push writes...
	h.add(pulled, gen) // ...and the reader comes back with the old value
	if got, _ := h.get(pulled.Digest); got.Origin != OriginPushed {
		t.Errorf("a read that raced a write rolled the origin back to %v", got.Origin)
	}
}

func TestHotManifestsStayWithinBudget(t *testing.T) {
	s, _ := newStore(t)
	s.hot.max = 64 << 10 // about 30 of these manifests
	var ms []Manifest
	for i := 0; i < 100; i++ {
		m := hotTestManifest(i, OriginPulled)
		if err := s.PutManifest(ManifestPut{Manifest: m}); err != nil {
			t.Fatal(err)
		}
		ms = append(ms, m)
	}
	for _, m := range ms { // dropped ones come from the index
		if got, err := s.GetManifest(m.Digest); err != nil || !bytes.Equal(got.Bytes, m.Bytes) {
			t.Fatalf("%s: %v", m.Digest, err)
		}
	}
	if held, charged := s.hot.held(); held > s.hot.max || held != charged {
		t.Errorf("%d bytes of manifests held in memory (%d counted), budget %d", held, charged, s.hot.max)
	}
	if _, ok := s.hot.get(ms[len(ms)-1].Digest); !ok {
		t.Error("the manifest read last is not held")
	}
}

func TestHotManifestsConcurrent(t *testing.T) {
	s, _ := newStore(t)
	var ms []Manifest
	for i := 0; i < 32; i++ {
		m := hotTestManifest(i, OriginPulled)
		if err := s.PutManifest(ManifestPut{Manifest: m}); err != nil {
			t.Fatal(err)
		}
		ms = append(ms, m)
	}
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 400; i++ {
				m := ms[(i*7+w)%len(ms)]
				if w%4 == 0 {
					m.Origin = OriginPushed
					if err := s.PutManifest(ManifestPut{Manifest: m}); err != nil {
						t.Error(err)
						return
					}
					continue
				}
				if got, err := s.GetManifest(m.Digest); err != nil || !bytes.Equal(got.Bytes, m.Bytes) {
					t.Errorf("read: %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
	for _, m := range ms {
		got, err := s.GetManifest(m.Digest)
		if err != nil {
			t.Fatal(err)
		}
		v, _ := s.ix.get(keyManifest(m.Digest))
		fromIndex, _ := decodeManifest(m.Digest, v)
		if got.Origin != fromIndex.Origin {
			t.Errorf("%s: memory says %v, the index %v", m.Digest, got.Origin, fromIndex.Origin)
		}
	}
}

// held adds up what the entries in memory cost, and what h counted.
func (h *hotManifests) held() (held, counted int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, m := range h.lru.Values() {
		held += hotCost(m)
	}
	return held, h.bytes
}

// A stream of manifests read once, far past the budget, pushes out the
// least recently used ones, one at a time: the manifests being read all
// along stay in memory, and the total stays within the budget.
func TestHotManifestsFloodKeepsWhatIsInUse(t *testing.T) {
	h := hotManifests{max: 64 << 10} // about 28 of these manifests
	hot := []Manifest{hotTestManifest(-1, OriginPulled), hotTestManifest(-2, OriginPushed)}
	for _, m := range hot {
		h.add(m, h.generation())
	}
	cold := hotTestManifest(-3, OriginPulled)
	h.add(cold, h.generation())
	for i := range 1000 {
		h.add(hotTestManifest(i, OriginPulled), h.generation())
		if i%10 == 0 {
			for _, m := range hot {
				if got, ok := h.get(m.Digest); !ok || got.Origin != m.Origin {
					t.Fatalf("after %d other manifests: %s, read all along, is not held", i+1, m.Digest)
				}
			}
		}
		if held, counted := h.held(); held > h.max || held != counted {
			t.Fatalf("after %d manifests: %d bytes held (%d counted), budget %d", i+1, held, counted, h.max)
		}
	}
	if _, ok := h.get(cold.Digest); ok {
		t.Error("a manifest not read since is held past the budget")
	}
	if _, ok := h.get(hotTestManifest(999, OriginPulled).Digest); !ok {
		t.Error("the manifest added last is not held")
	}
	if held, _ := h.held(); held < h.max*3/4 {
		t.Errorf("%d bytes held after the stream, budget %d: evicting far more than needed", held, h.max)
	}
	// Tiny manifests count their overhead: the budget bounds their number.
	for i := range 10_000 {
		b := []byte(fmt.Sprint(i))
		h.add(Manifest{Digest: digest.FromBytes(b), Bytes: b}, h.generation())
	}
	h.mu.Lock()
	n := h.lru.Len()
	h.mu.Unlock()
	if n > h.max/hotEntryOverhead {
		t.Errorf("%d tiny manifests held, want at most %d", n, h.max/hotEntryOverhead)
	}
	// A giant is never held; forget drops an entry.
	giant := Manifest{Digest: digest.FromString("giant"), Bytes: bytes.Repeat([]byte("x"), h.max/8+1)}
	h.add(giant, h.generation())
	if _, ok := h.get(giant.Digest); ok {
		t.Error("a manifest over an eighth of the budget is held")
	}
	h.forget(hot[0].Digest)
	if _, ok := h.get(hot[0].Digest); ok {
		t.Error("a forgotten manifest is held")
	}
	if held, counted := h.held(); held != counted {
		t.Errorf("%d bytes held, %d counted", held, counted)
	}
}

// BenchmarkHotManifestsGet: warm reads of a working set that fits, from
// many goroutines, as a warm pull by tag does them.
func BenchmarkHotManifestsGet(b *testing.B) {
	var h hotManifests
	var ds []digest.Digest
	for i := range 512 {
		m := hotTestManifest(i, OriginPulled)
		h.add(m, h.generation())
		ds = append(ds, m.Digest)
	}
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if _, ok := h.get(ds[i%len(ds)]); !ok {
				b.Error("miss")
				return
			}
			i += 7
		}
	})
}

// GetManifest's bytes are the caller's: changing them changes nothing
// another reader gets. GetManifestReadOnly answers the same manifest.
func TestHotManifestsGetManifestBytesAreTheCallers(t *testing.T) {
	s, _ := newStore(t)
	m := hotTestManifest(1, OriginPulled)
	if err := s.PutManifest(ManifestPut{Manifest: m}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		got, err := s.GetManifest(m.Digest)
		if err != nil {
			t.Fatal(err)
		}
		clear(got.Bytes) // the caller's to scribble on
		ro, err := s.GetManifestReadOnly(m.Digest)
		if err != nil || !bytes.Equal(ro.Bytes, m.Bytes) || ro.MediaType != m.MediaType || ro.Origin != m.Origin {
			t.Fatalf("read %d: the read-only manifest is not the stored one: %v", i, err)
		}
	}
	if _, err := s.GetManifestReadOnly(digest.FromString("absent")); !errors.Is(err, ErrNotFound) {
		t.Errorf("an absent manifest: %v", err)
	}
}
