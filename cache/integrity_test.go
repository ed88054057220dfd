package cache

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// Store integrity: each test here was written against a way the store
// lost or corrupted content it had acknowledged (issue 12), and failed
// before the fix.

const ociManifest = "application/vnd.oci.image.manifest.v1+json"

// manifestOf is an OCI image manifest of config and layers.
func manifestOf(config []byte, layers ...[]byte) []byte {
	var ls []string
	for _, l := range layers {
		ls = append(ls, fmt.Sprintf(`{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":%q,"size":%d}`, digest.FromBytes(l), len(l)))
	}
	return []byte(fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":%d},"layers":[%s]}`,
		ociManifest, digest.FromBytes(config), len(config), strings.Join(ls, ",")))
}

// Item 1: a manifest that lands while a GC pass runs, and refers to an
// old blob nothing referenced when the pass began, keeps that blob.
func TestGCKeepsABlobAManifestReferencedDuringThePass(t *testing.T) {
	clk := &clock{now: time.Unix(1_700_000_000, 0)}
	s := openLife(t, t.TempDir(), Options{Now: clk.Now, GCGrace: time.Hour})
	cb, lb := []byte("an old config nobody references"), []byte("an old layer nobody references")
	config, layer := put(t, s, cb, OriginPushed), put(t, s, lb, OriginPushed)
	if err := s.Link("", "app", config, layer); err != nil {
		t.Fatal(err)
	}
	clk.Add(2 * time.Hour)
	man := manifestOf(cb, lb)
	md := digest.FromBytes(man)
	var putErr error
	gcSweepHook = func() {
		gcSweepHook = nil
		// A manifest PUT: its references are there, it is stored,
		// linked and tagged, and the client gets its 201.
		putErr = s.PutManifest(ManifestPut{Repo: "app", Local: true, Tags: []string{"v1"},
			Manifest: Manifest{Digest: md, MediaType: ociManifest, Bytes: man, Origin: OriginPushed}})
	}
	t.Cleanup(func() { gcSweepHook = nil })
	if _, err := s.GC(GCOptions{}); err != nil {
		t.Fatal(err)
	}
	if putErr != nil {
		t.Fatalf("the manifest PUT during the pass failed: %v", putErr)
	}
	for _, d := range []digest.Digest{config, layer} {
		if !has(s, d) {
			t.Errorf("blob %s of a manifest acknowledged during the pass was removed", d)
		}
	}
}

// Item 5: a media type the value encoding cannot hold is refused, never
// stored as different bytes under the same digest.
func TestManifestMediaTypeBeyondTheEncodingIsRefused(t *testing.T) {
	s, _ := newStore(t)
	man := []byte(`{"schemaVersion":2}`)
	d := digest.FromBytes(man)
	mt := "application/" + strings.Repeat("x", 70000)
	err := s.PutManifest(ManifestPut{Manifest: Manifest{Digest: d, MediaType: mt, Bytes: man, Origin: OriginPulled}})
	if err == nil {
		got, gerr := s.GetManifest(d)
		t.Fatalf("a %d-byte media type was stored; read back: %v, %d bytes (want %d), media type of %d bytes",
			len(mt), gerr, len(got.Bytes), len(man), len(got.MediaType))
	}
	if _, err := s.GetManifest(d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after a refused put: %v, want ErrNotFound", err)
	}
}

// Item 6: a final PUT whose commit fails for a reason that may pass (a
// failed fsync, a full disk) keeps the upload: the client retries the PUT.
func TestFinishUploadThatFailsTransientlyCanBeRetried(t *testing.T) {
	for _, fail := range []error{syscall.EIO, syscall.ENOSPC} {
		t.Run(fail.Error(), func(t *testing.T) {
			clk := &clock{now: time.Unix(1_700_000_000, 0)}
			s, _ := newStoreOpts(t, Options{Now: clk.Now})
			b := testBytes(1<<20, 3)
			d := digest.FromBytes(b)
			half := int64(len(b) / 2)
			u, err := s.CreateUpload("app", time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := s.AppendUpload(u.ID, 0, bytes.NewReader(b[:half]), half, time.Hour); err != nil {
				t.Fatal(err)
			}
			fsync = func(*os.File) error { return &os.PathError{Op: "fsync", Path: "blob", Err: fail} }
			t.Cleanup(func() { fsync = (*os.File).Sync })
			if _, err := s.FinishUpload(u.ID, half, bytes.NewReader(b[half:]), int64(len(b))-half, d, OriginPushed, time.Hour); err == nil {
				t.Fatal("the commit succeeded with a failing fsync")
			}
			fsync = (*os.File).Sync
			if got, err := s.GetUpload(u.ID); err != nil || got.Size != half {
				t.Fatalf("after a failed commit the upload is %+v, %v; want it kept with the %d acknowledged bytes", got, err, half)
			}
			// The client retries the PUT, with its last chunk, a while
			// later (a full disk fails new writes fast for a moment).
			clk.Add(time.Minute)
			if _, err := s.FinishUpload(u.ID, half, bytes.NewReader(b[half:]), int64(len(b))-half, d, OriginPushed, time.Hour); err != nil {
				t.Fatalf("retried PUT: %v", err)
			}
			checkStored(t, s, d, b, OriginPushed)
		})
	}
}

// Item 7: a commit that creates a blob directory fsyncs its parent, so
// that the directory's own entry survives a power cut.
func TestNewBlobDirectoryIsSyncedInItsParent(t *testing.T) {
	s, dir := newStore(t)
	var mu sync.Mutex
	var synced []string
	syncDirHook = func(d string) {
		mu.Lock()
		synced = append(synced, d)
		mu.Unlock()
	}
	t.Cleanup(func() { syncDirHook = nil })
	b := []byte("the first blob of a fresh store")
	d := put(t, s, b, OriginPushed)
	mu.Lock()
	defer mu.Unlock()
	for _, want := range []string{
		filepath.Dir(s.blobPath(d)),           // the file's entry
		filepath.Join(dir, "blobs", "sha256"), // the new <xx> directory's entry
		filepath.Join(dir, "blobs"),           // the new sha256 directory's entry
	} {
		if !slices.Contains(synced, want) {
			t.Errorf("%s was not fsynced; synced: %v", want, synced)
		}
	}
}

// Item 11: a pulled manifest that no tag or index references any more
// (its tag moved upstream) and that nobody used within the grace is
// collected with its links, and so are the blobs only it referenced.
func TestGCCollectsManifestsATagMovedAwayFrom(t *testing.T) {
	clk := &clock{now: time.Unix(1_700_000_000, 0)}
	s := openLife(t, t.TempDir(), Options{Now: clk.Now, GCGrace: time.Hour})
	const ns, repo = "up.example", "library/app"
	cb, ob, nb := []byte("config"), []byte("old layer"), []byte("current layer")
	config, old, cur := put(t, s, cb, OriginPulled), put(t, s, ob, OriginPulled), put(t, s, nb, OriginPulled)
	m1, m2 := manifestOf(cb, ob), manifestOf(cb, nb)
	d1, d2 := digest.FromBytes(m1), digest.FromBytes(m2)
	for _, m := range []struct {
		d digest.Digest
		b []byte
	}{{d1, m1}, {d2, m2}} {
		if err := s.PutManifest(ManifestPut{Manifest: Manifest{Digest: m.d, MediaType: ociManifest, Bytes: m.b, Origin: OriginPulled}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Link(ns, repo, d1, config, old); err != nil {
		t.Fatal(err)
	}
	if err := s.SetTag(ns, repo, "latest", Tag{Digest: d1, FetchedAt: clk.Now()}); err != nil {
		t.Fatal(err)
	}
	clk.Add(2 * time.Hour)
	if err := s.Link(ns, repo, d2, config, cur); err != nil {
		t.Fatal(err)
	}
	if err := s.SetTag(ns, repo, "latest", Tag{Digest: d2, FetchedAt: clk.Now()}); err != nil {
		t.Fatal(err)
	}
	clk.Add(2 * time.Hour)
	if _, err := s.GC(GCOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetManifest(d1); !errors.Is(err, ErrNotFound) {
		t.Errorf("the manifest the tag moved away from is still stored (%v)", err)
	}
	if ok, _ := s.Linked(ns, repo, d1); ok {
		t.Error("the collected manifest is still linked")
	}
	if has(s, old) {
		t.Error("the layer only the collected manifest referenced is still stored")
	}
	if ok, _ := s.Linked(ns, repo, old); ok {
		t.Error("the collected layer is still linked")
	}
	if _, err := s.GetManifest(d2); err != nil {
		t.Errorf("the tagged manifest: %v", err)
	}
	for _, d := range []digest.Digest{config, cur} {
		if !has(s, d) {
			t.Errorf("blob %s of the tagged manifest was removed", d)
		}
	}
}

// Item 11: manifests count toward the budget and pulled ones are evicted
// least recently used first, like pulled blobs; pushed ones never are.
func TestManifestsCountTowardTheBudget(t *testing.T) {
	clk := &clock{now: time.Unix(1_700_000_000, 0)}
	s := openLife(t, t.TempDir(), Options{Now: clk.Now, MaxSize: 20_000, LowWatermark: 0.5, HighWatermark: 0.9})
	manifest := func(i int) Manifest {
		b := []byte(fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"annotations":{"n":"%d","pad":%q}}`, ociManifest, i, strings.Repeat("p", 900)))
		return Manifest{Digest: digest.FromBytes(b), MediaType: ociManifest, Bytes: b, Origin: OriginPulled}
	}
	pushed := manifest(-1)
	pushed.Origin = OriginPushed
	if err := s.PutManifest(ManifestPut{Manifest: pushed}); err != nil {
		t.Fatal(err)
	}
	var pulled []Manifest
	for i := range 20 {
		if i == 15 { // under the high mark so far: nothing evicted yet
			if got := s.Stats().Bytes; got < 16*900 {
				t.Fatalf("stats count %d bytes for 16 manifests of about 1000 bytes", got)
			}
		}
		clk.Add(time.Minute)
		m := manifest(i)
		if err := s.PutManifest(ManifestPut{Manifest: m}); err != nil {
			t.Fatal(err)
		}
		s.Touch(m.Digest)
		pulled = append(pulled, m)
	}
	if _, err := s.EvictToBudget(); err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st.Bytes > 18_000 || st.EvictedManifests == 0 {
		t.Errorf("after eviction %d bytes, %d manifests evicted; want at most the high mark, 18000", st.Bytes, st.EvictedManifests)
	}
	if _, err := s.GetManifest(pushed.Digest); err != nil {
		t.Errorf("the pushed manifest: %v", err)
	}
	if _, err := s.GetManifest(pulled[0].Digest); !errors.Is(err, ErrNotFound) {
		t.Errorf("the least recently used pulled manifest is still stored (%v)", err)
	}
	if _, err := s.GetManifest(pulled[19].Digest); err != nil {
		t.Errorf("the most recently used pulled manifest: %v", err)
	}
}

// Item 12: junk in the blob directories (short names, names that are not
// hex, files where directories belong) is skipped at startup with a
// warning; it neither panics nor stops the store, nor is it deleted.
func TestJunkInBlobDirectoriesIsSkipped(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	b := []byte("a real blob")
	d := put(t, s, b, OriginPushed)
	s.Close()
	root := filepath.Join(dir, "blobs", "sha256")
	junk := []string{
		filepath.Join(root, "ab", "x"),
		filepath.Join(root, "ab", ".hidden"),
		filepath.Join(root, "zz", "not-hex-at-all"),
		filepath.Join(root, "abc", "def"),
		filepath.Join(root, "README"),
		filepath.Join(dir, "blobs", "md5", "aa", "bb"),
	}
	for _, p := range junk {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("junk"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	s, err = Open(dir, Options{})
	if err != nil {
		t.Fatalf("Open with junk in the blob directories: %v", err)
	}
	defer s.Close()
	if got, _ := readBlob(t, s, d); !bytes.Equal(got, b) {
		t.Error("the real blob is not served after the restart")
	}
	for _, p := range junk {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("junk %s: %v (it should be left alone)", p, err)
		}
	}
}

// Item 13: an eviction pass sees access times still on their way to the
// index (another flush holds them), so a blob just used is not the one it
// evicts.
func TestEvictionSeesAccessTimesStillBeingFlushed(t *testing.T) {
	clk := &clock{now: time.Unix(1_700_000_000, 0)}
	s := openLife(t, t.TempDir(), Options{Now: clk.Now, MaxSize: 10_000, LowWatermark: 0.5, HighWatermark: 0.9})
	var blobs []digest.Digest
	for i := range 9 { // 9000 bytes: at the high mark, not past it
		clk.Add(time.Minute)
		b, _ := blobOf(i, 1000)
		blobs = append(blobs, put(t, s, b, OriginPulled))
	}
	clk.Add(time.Minute)
	s.Touch(blobs[0]) // the oldest blob is served: now the newest

	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	flushHook = func() {
		once.Do(func() {
			close(entered)
			<-release
		})
	}
	t.Cleanup(func() { flushHook = nil })
	flushed := make(chan error, 1)
	go func() { flushed <- s.flushAccess() }() // the maintenance loop's flush
	<-entered
	var evictErr error
	evicted := make(chan struct{})
	go func() {
		_, evictErr = s.Evict(8000, false) // one blob must go
		close(evicted)
	}()
	select {
	case <-evicted:
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	if err := <-flushed; err != nil {
		t.Fatal(err)
	}
	select {
	case <-evicted:
	case <-time.After(waitLong):
		t.Fatal("the eviction pass never ended")
	}
	if evictErr != nil {
		t.Fatal(evictErr)
	}
	if !has(s, blobs[0]) {
		t.Error("the blob used last was evicted")
	}
	if has(s, blobs[1]) {
		t.Error("the least recently used blob was not evicted")
	}
}

// Tag lists and referrers indexes fetched from an upstream have a
// lifecycle too: GC drops them once their repository (or the subject in
// it) holds nothing any more and they are older than the grace.
func TestGCDropsFetchedListsOfWhatIsGone(t *testing.T) {
	clk := &clock{now: time.Unix(1_700_000_000, 0)}
	s := openLife(t, t.TempDir(), Options{Now: clk.Now, GCGrace: time.Hour})
	const ns = "up.example"
	man := []byte(`{"schemaVersion":2}`)
	md := digest.FromBytes(man)
	if err := s.PutManifest(ManifestPut{NS: ns, Repo: "kept", Manifest: Manifest{Digest: md, MediaType: ociManifest, Bytes: man, Origin: OriginPulled}}); err != nil {
		t.Fatal(err)
	}
	if err := s.SetTag(ns, "kept", "v1", Tag{Digest: md, FetchedAt: clk.Now()}); err != nil {
		t.Fatal(err)
	}
	for _, repo := range []string{"kept", "gone"} {
		if err := s.SetTagList(ns, repo, []string{"v1", "not a tag", "v2"}, clk.Now()); err != nil {
			t.Fatal(err)
		}
		for _, subject := range []digest.Digest{md, digest.FromString("nothing")} {
			if err := s.SetReferrers(ns, repo, subject, []byte("[]"), clk.Now()); err != nil {
				t.Fatal(err)
			}
		}
	}
	if tags, _, err := s.TagList(ns, "kept"); err != nil || !slices.Equal(tags, []string{"v1", "v2"}) {
		t.Fatalf("TagList = %v, %v", tags, err)
	}
	if _, err := s.GC(GCOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.TagList(ns, "gone"); err != nil {
		t.Fatal("a fresh tag list was dropped")
	}
	clk.Add(2 * time.Hour)
	if _, err := s.GC(GCOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.TagList(ns, "kept"); err != nil {
		t.Errorf("the tag list of a repository that holds a tag: %v", err)
	}
	if _, _, err := s.TagList(ns, "gone"); !errors.Is(err, ErrNotFound) {
		t.Errorf("the tag list of a repository that holds nothing: %v", err)
	}
	if _, _, err := s.CachedReferrers(ns, "kept", md); err != nil {
		t.Errorf("the referrers of a subject its repository links: %v", err)
	}
	for _, c := range []struct {
		repo    string
		subject digest.Digest
	}{{"kept", digest.FromString("nothing")}, {"gone", md}} {
		if _, _, err := s.CachedReferrers(ns, c.repo, c.subject); !errors.Is(err, ErrNotFound) {
			t.Errorf("referrers of %s in %s: %v, want dropped", c.subject, c.repo, err)
		}
	}
}
