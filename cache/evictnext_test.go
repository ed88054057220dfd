package cache

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// EvictNext lists what the next pass takes first, oldest first, and
// leaves out what eviction never takes: pushed, pinned and open content.
// It answers the same below the high mark, and removes nothing.
func TestEvictNextListsTheLeastRecentlyUsedEvictable(t *testing.T) {
	clk := &clock{now: time.Unix(1_700_000_000, 0)}
	s := openLife(t, t.TempDir(), Options{Now: clk.Now, MaxSize: 1 << 30,
		Pins: []Pin{{NS: "up.example", Repo: "library/golang"}}})
	put(t, s, bytes.Repeat([]byte("P"), 1000), OriginPushed)
	pinned := put(t, s, bytes.Repeat([]byte("L"), 1000), OriginPulled)
	if err := s.Link("up.example", "library/golang", pinned); err != nil {
		t.Fatal(err)
	}
	var pulled []digest.Digest
	for i := range 5 {
		clk.Add(time.Minute)
		b, _ := blobOf(i, 100*(i+1))
		pulled = append(pulled, put(t, s, b, OriginPulled))
	}
	clk.Add(time.Minute)
	man := []byte(fmt.Sprintf(`{"schemaVersion":2,"layers":[{"digest":%q}]}`, pulled[4]))
	md := digest.FromBytes(man)
	if err := s.PutManifest(ManifestPut{Manifest: Manifest{Digest: md, Bytes: man, MediaType: mtOCIManifest, Origin: OriginPulled}}); err != nil {
		t.Fatal(err)
	}
	clk.Add(time.Minute)
	f, _, err := s.OpenBlob(pulled[0]) // a use: now the newest, and open
	if err != nil {
		t.Fatal(err)
	}

	next, err := s.EvictNext(10)
	if err != nil {
		t.Fatal(err)
	}
	want := []digest.Digest{pulled[1], pulled[2], pulled[3], pulled[4], md}
	if len(next) != len(want) {
		t.Fatalf("EvictNext = %+v, want %v", next, want)
	}
	for i, c := range next {
		if c.Digest != want[i] {
			t.Errorf("EvictNext[%d] = %s, want %s", i, c.Digest, want[i])
		}
	}
	if next[0].Kind != "blob" || next[0].Size != 200 || !next[0].LastUse.Equal(time.Unix(1_700_000_000, 0).Add(2*time.Minute)) {
		t.Errorf("first candidate %+v", next[0])
	}
	if last := next[len(next)-1]; last.Kind != "manifest" || last.Size != int64(len(man)) {
		t.Errorf("the manifest: %+v", last)
	}

	f.Close()
	if next, _ := s.EvictNext(2); len(next) != 2 || next[0].Digest != pulled[1] || next[1].Digest != pulled[2] {
		t.Errorf("EvictNext(2) = %+v", next)
	}
	if next, _ := s.EvictNext(1 << 20); len(next) != 6 || next[5].Digest != pulled[0] {
		t.Errorf("once closed, the blob just used comes last: %+v", next)
	}
	if st := s.Stats(); st.Blobs != 7 || st.Evicted != 0 {
		t.Errorf("EvictNext removed something: %+v", st)
	}
}
