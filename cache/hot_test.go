package cache

import (
	"bytes"
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
	s.hot.mu.Lock()
	held := s.hot.curBytes
	for _, m := range s.hot.prev {
		held += len(m.Bytes)
	}
	s.hot.mu.Unlock()
	if held > s.hot.max {
		t.Errorf("%d bytes of manifests held in memory, budget %d", held, s.hot.max)
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
