package push

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"slipway/cache"
)

func openStore(t *testing.T, dir string) *cache.Store {
	t.Helper()
	s, err := cache.Open(dir, cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func newManager(t *testing.T, s *cache.Store, cfg Config) *Manager {
	t.Helper()
	cfg.Store = s
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// push must not import upstream, mirror or echo (DESIGN.md: imports run
// cmd -> mirror -> {upstream, push} -> cache).
func TestImports(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, p := range strings.Fields(string(out)) {
		if p == "slipway/upstream" || p == "slipway/mirror" || strings.HasPrefix(p, "github.com/labstack/") {
			t.Errorf("push imports %s", p)
		}
	}
}

func TestPrefixes(t *testing.T) {
	s := openStore(t, t.TempDir())
	defer s.Close()
	m := newManager(t, s, Config{Prefixes: []string{"ci/", " team/a ", ""}})
	defer m.Close()
	for name, want := range map[string]bool{"ci": true, "ci/app": true, "cix": false, "team/a/b": true, "team/ab": false, "other": false} {
		if m.Claims(name) != want || m.Permits(name) != want {
			t.Errorf("%s: Claims %v, Permits %v, want %v", name, m.Claims(name), m.Permits(name), want)
		}
	}
	open := newManager(t, s, Config{})
	defer open.Close()
	if open.Claims("ci/app") || !open.Permits("anything/at/all") {
		t.Error("without prefixes: nothing claimed, everything permitted")
	}
	if _, err := m.StartUpload("other/app"); !errors.Is(err, ErrDenied) {
		t.Errorf("upload outside the prefixes: %v, want ErrDenied", err)
	}
}

// A chunked upload resumes after the store and Manager restart, and
// finishes under sha512 too (the running hash is sha256; the file is read
// again for another algorithm).
func TestUploadResumesAfterRestart(t *testing.T) {
	dir := t.TempDir()
	b := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB
	for _, alg := range []digest.Algorithm{digest.SHA256, digest.SHA512} {
		t.Run(string(alg), func(t *testing.T) {
			s := openStore(t, dir)
			m := newManager(t, s, Config{})
			u, err := m.StartUpload("ci/app")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := m.WriteUpload("ci/app", u.ID, bytes.NewReader(b[:300<<10]), 0, 300<<10); err != nil {
				t.Fatal(err)
			}
			m.Close()
			s.Close()

			s = openStore(t, dir)
			defer s.Close()
			m = newManager(t, s, Config{})
			defer m.Close()
			got, err := m.Upload("ci/app", u.ID)
			if err != nil || got.Size != 300<<10 {
				t.Fatalf("after restart: %+v, %v", got, err)
			}
			if _, err := m.WriteUpload("ci/app", u.ID, bytes.NewReader(b[300<<10:700<<10]), -1, -1); err != nil {
				t.Fatal(err)
			}
			d := alg.FromBytes(b)
			info, err := m.FinishUpload("ci/app", u.ID, d, bytes.NewReader(b[700<<10:]), 700<<10, int64(len(b)-700<<10))
			if err != nil {
				t.Fatal(err)
			}
			if info.Size != int64(len(b)) || info.Origin != cache.OriginPushed {
				t.Errorf("stored %+v", info)
			}
			f, _, err := m.Blob("ci/app", d)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := m.Upload("ci/app", u.ID); !errors.Is(err, ErrUploadUnknown) {
				t.Errorf("finished upload still known: %v", err)
			}
		})
	}
}

// Chunks that do not continue the upload, and bytes that do not match the
// digest, change nothing and store nothing.
func TestUploadBadChunks(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	defer s.Close()
	m := newManager(t, s, Config{})
	defer m.Close()
	u, _ := m.StartUpload("ci/app")
	if _, err := m.WriteUpload("ci/app", u.ID, strings.NewReader("hello"), 0, 5); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		start, length int64
		body          string
		want          error
	}{
		{10, 5, "world", ErrRangeInvalid}, // gap
		{2, 5, "world", ErrRangeInvalid},  // overlap
		{5, 9, "world", ErrSizeInvalid},   // short body
	} {
		if _, err := m.WriteUpload("ci/app", u.ID, strings.NewReader(c.body), c.start, c.length); !errors.Is(err, c.want) {
			t.Errorf("chunk at %d: %v, want %v", c.start, err, c.want)
		}
	}
	if got, _ := m.Upload("ci/app", u.ID); got.Size != 5 {
		t.Errorf("upload has %d bytes after bad chunks, want 5", got.Size)
	}
	if _, err := m.WriteUpload("ci/other", u.ID, strings.NewReader("x"), -1, 1); !errors.Is(err, ErrUploadUnknown) {
		t.Errorf("another repository's upload: %v", err)
	}
	wrong := digest.FromString("not hello")
	if _, err := m.FinishUpload("ci/app", u.ID, wrong, nil, -1, 0); !errors.Is(err, ErrDigestInvalid) {
		t.Errorf("wrong digest: %v", err)
	}
	if _, err := s.StatBlob(wrong); err == nil {
		t.Error("a blob with the wrong digest was stored")
	}
	if _, err := m.FinishUpload("ci/app", u.ID, digest.FromString("hello"), nil, -1, 0); !errors.Is(err, ErrUploadUnknown) {
		t.Errorf("finishing again after a failed finish: %v", err)
	}
	if n := countTemp(t, dir); n != 0 {
		t.Errorf("%d temp files left", n)
	}
}

func countTemp(t *testing.T, dir string) int {
	t.Helper()
	e, err := os.ReadDir(filepath.Join(dir, "tmp"))
	if err != nil {
		t.Fatal(err)
	}
	return len(e)
}

// An upload nobody touches for the TTL is forgotten (badger TTL) and its
// file reaped; the reaper loop stops on Close.
func TestAbandonedUploadsAreReaped(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	defer s.Close()
	m := newManager(t, s, Config{UploadTTL: time.Second, ReapInterval: 100 * time.Millisecond})
	u, _ := m.StartUpload("ci/app")
	if _, err := m.WriteUpload("ci/app", u.ID, strings.NewReader("abandoned"), 0, 9); err != nil {
		t.Fatal(err)
	}
	live, _ := m.StartUpload("ci/app")
	deadline := time.Now().Add(10 * time.Second)
	for countTemp(t, dir) > 1 && time.Now().Before(deadline) {
		// Keep one upload alive: writes renew its TTL and its file.
		if _, err := m.WriteUpload("ci/app", live.ID, strings.NewReader("x"), -1, 1); err != nil {
			t.Fatalf("a live upload was lost: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if n := countTemp(t, dir); n != 1 {
		t.Fatalf("%d temp files after the TTL, want 1 (the live upload)", n)
	}
	if _, err := m.Upload("ci/app", u.ID); !errors.Is(err, ErrUploadUnknown) {
		t.Errorf("abandoned upload: %v, want ErrUploadUnknown", err)
	}
	if _, err := m.Upload("ci/app", live.ID); err != nil {
		t.Errorf("live upload: %v", err)
	}
	done := make(chan struct{})
	go func() { m.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not stop the reaper")
	}
}

func pushBlob(t *testing.T, m *Manager, repo string, b []byte) digest.Digest {
	t.Helper()
	d := digest.FromBytes(b)
	if _, err := m.PutBlob(repo, d, bytes.NewReader(b), int64(len(b))); err != nil {
		t.Fatal(err)
	}
	return d
}

func TestMount(t *testing.T) {
	s := openStore(t, t.TempDir())
	defer s.Close()
	m := newManager(t, s, Config{})
	defer m.Close()
	pushed := pushBlob(t, m, "ci/src", []byte("pushed"))
	pulledBytes := []byte("pulled")
	pulled := digest.FromBytes(pulledBytes)
	if err := s.PutBlob(bytes.NewReader(pulledBytes), pulled, cache.OriginPulled); err != nil {
		t.Fatal(err)
	}
	if err := s.Link("registry.example", "team/app", pulled); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		d    digest.Digest
		from *Source
		want bool
	}{
		{"anonymous, pushed blob", pushed, nil, true},
		{"anonymous, pulled blob", pulled, nil, false},
		{"from a repository without it", pushed, &Source{Repo: "ci/none"}, false},
		{"from a local repository", pushed, &Source{Repo: "ci/src"}, true},
		{"from a proxied repository", pulled, &Source{NS: "registry.example", Repo: "team/app"}, true},
		{"unknown blob", digest.FromString("nothing"), nil, false},
	} {
		ok, err := m.Mount("ci/dst", c.d, c.from)
		if err != nil || ok != c.want {
			t.Errorf("%s: %v, %v; want %v", c.name, ok, err, c.want)
		}
	}
	if _, err := m.StatBlob("ci/dst", pulled); err != nil {
		t.Errorf("mounted blob not in ci/dst: %v", err)
	}
	if info, _ := s.StatBlob(pulled); info.Origin != cache.OriginPushed {
		t.Error("a blob mounted into a local repository is not pinned")
	}
}

func TestPutManifest(t *testing.T) {
	s := openStore(t, t.TempDir())
	defer s.Close()
	m := newManager(t, s, Config{})
	defer m.Close()
	cfg := pushBlob(t, m, "ci/app", []byte(`{}`))
	layer := pushBlob(t, m, "ci/app", []byte("layer"))
	const oci = "application/vnd.oci.image.manifest.v1+json"
	image := func(layers string, extra string) []byte {
		return []byte(fmt.Sprintf(`{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":2},"layers":[%s]%s}`, oci, cfg, layers, extra))
	}
	layerDesc := fmt.Sprintf(`{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":5}`, layer)
	foreign := fmt.Sprintf(`{"mediaType":"application/vnd.oci.image.layer.nondistributable.v1.tar","digest":"%s","size":123,"urls":["https://example.com/x"]}`, digest.FromString("elsewhere"))
	subject := fmt.Sprintf(`,"subject":{"mediaType":"%s","digest":"%s","size":10}`, oci, digest.FromString("no such manifest"))
	for _, c := range []struct {
		name, contentType string
		body              []byte
		want              error
	}{
		{"image", oci, image(layerDesc, ""), nil},
		{"media type from the body", "", image(layerDesc, ""), nil},
		{"non-distributable layer not pushed", oci, image(layerDesc+","+foreign, ""), nil},
		{"subject that does not exist", oci, image(layerDesc, subject), nil},
		{"size mismatch", oci, bytes.Replace(image(layerDesc, ""), []byte(`"size":5`), []byte(`"size":6`), 1), ErrManifestInvalid},
		{"schemaVersion 1", oci, bytes.Replace(image(layerDesc, ""), []byte(`"schemaVersion":2`), []byte(`"schemaVersion":1`), 1), ErrManifestInvalid},
		{"index with layers", "application/vnd.oci.image.index.v1+json", []byte(`{"schemaVersion":2,"manifests":[],"layers":[]}`), ErrManifestInvalid},
		{"too large", oci, bytes.Repeat([]byte(" "), MaxManifestSize+1), ErrManifestTooLarge},
	} {
		p, err := m.PutManifest("ci/app", "v1", nil, c.contentType, c.body)
		if !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
			continue
		}
		if err == nil && (p.Digest != digest.FromBytes(c.body) || p.MediaType != oci) {
			t.Errorf("%s: %+v", c.name, p)
		}
	}
	// The subject's referrers list the artifact.
	idx, err := m.Referrers("ci/app", digest.FromString("no such manifest"), "")
	if err != nil || len(idx.Manifests) != 1 || idx.Manifests[0].ArtifactType != "application/vnd.oci.image.config.v1+json" {
		t.Errorf("referrers: %+v, %v", idx.Manifests, err)
	}
}
