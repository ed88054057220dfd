package cache

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

const (
	mtOCIManifest    = "application/vnd.oci.image.manifest.v1+json"
	mtOCIIndex       = "application/vnd.oci.image.index.v1+json"
	mtDockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
)

// Deliberately not canonical JSON (spacing, key order, trailing newline):
// the store must keep the bytes exactly, or the digest no longer holds.
var testManifest = []byte(`{
  "schemaVersion": 2,
  "mediaType": "application/vnd.oci.image.manifest.v1+json",
  "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:1111111111111111111111111111111111111111111111111111111111111111", "size": 7},
  "layers": [
    {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:2222222222222222222222222222222222222222222222222222222222222222", "size": 32654},
    {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 16724, "digest": "sha256:3333333333333333333333333333333333333333333333333333333333333333"}
  ]
}
`)

func TestPutManifestVerifiesDigest(t *testing.T) {
	s, _ := newStore(t)
	good := digest.FromBytes(testManifest)
	tests := []struct {
		name string
		d    digest.Digest
		want error // nil: any error
	}{
		{"other content", digest.FromString("{}"), ErrDigestMismatch},
		{"one byte off", digest.FromBytes(testManifest[:len(testManifest)-1]), ErrDigestMismatch},
		{"sha512 of other content", digest.SHA512.FromString("{}"), ErrDigestMismatch},
		{"malformed", "sha256:1234", nil},
		{"empty", "", nil},
		{"unknown algorithm", "md5:d41d8cd98f00b204e9800998ecf8427e", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := s.PutManifest(ManifestPut{Manifest: Manifest{Digest: tt.d, MediaType: mtOCIManifest, Bytes: testManifest, Origin: OriginPushed}})
			if err == nil {
				t.Fatal("PutManifest succeeded")
			}
			if tt.want != nil && !errors.Is(err, tt.want) {
				t.Fatalf("PutManifest = %v, want %v", err, tt.want)
			}
			if tt.d.Validate() == nil {
				if _, err := s.GetManifest(tt.d); !errors.Is(err, ErrNotFound) {
					t.Fatalf("GetManifest after a rejected put = %v, want ErrNotFound", err)
				}
			}
		})
	}
	if _, err := s.GetManifest(good); !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetManifest(good) = %v, want ErrNotFound", err)
	}
	if n := countKeys(t, s, prefixManifest); n != 0 {
		t.Fatalf("%d manifest entries after rejected puts", n)
	}
}

func TestManifestRoundTrip(t *testing.T) {
	s, _ := newStore(t)
	longest := "application/vnd.example." + string(bytes.Repeat([]byte("x"), MaxMediaTypeLength-len("application/vnd.example.+json"))) + "+json"
	tests := []struct {
		name   string
		m      Manifest
		wantMT string // the media type stored, if not m's
	}{
		{"oci manifest", Manifest{MediaType: mtOCIManifest, Bytes: testManifest, Origin: OriginPulled}, ""},
		{"sha512", Manifest{MediaType: mtOCIIndex, Bytes: []byte(`{"schemaVersion":2,"manifests":[]}`), Origin: OriginPushed}, ""},
		{"docker with parameters", Manifest{MediaType: mtDockerManifest + "; charset=utf-8", Bytes: []byte(`{"schemaVersion": 2}`), Origin: OriginPulled}, mtDockerManifest},
		{"upper case", Manifest{MediaType: "Application/VND.OCI.image.manifest.v1+JSON", Bytes: []byte(`{"schemaVersion": 2 }`), Origin: OriginPulled}, mtOCIManifest},
		{"empty media type", Manifest{MediaType: "", Bytes: []byte(`{"a":1}`), Origin: OriginPushed}, ""},
		{"longest media type", Manifest{MediaType: longest, Bytes: []byte(`{"b":2}`), Origin: OriginPulled}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := tt.m
			m.Digest = digest.FromBytes(m.Bytes)
			if tt.name == "sha512" {
				m.Digest = digest.SHA512.FromBytes(m.Bytes)
			}
			if err := s.PutManifest(ManifestPut{Manifest: m}); err != nil {
				t.Fatalf("PutManifest: %v", err)
			}
			got, err := s.GetManifest(m.Digest)
			if err != nil {
				t.Fatalf("GetManifest: %v", err)
			}
			if tt.wantMT != "" {
				m.MediaType = tt.wantMT
			}
			if got.Digest != m.Digest || got.MediaType != m.MediaType || got.Origin != m.Origin || !bytes.Equal(got.Bytes, m.Bytes) {
				t.Fatalf("GetManifest = %+v\nwant %+v", got, m)
			}
			if digest.FromBytes(got.Bytes) != digest.FromBytes(m.Bytes) {
				t.Fatal("bytes changed")
			}
			// The returned bytes are the caller's to keep.
			if len(got.Bytes) > 0 {
				got.Bytes[0] ^= 0xff
				again, _ := s.GetManifest(m.Digest)
				if !bytes.Equal(again.Bytes, m.Bytes) {
					t.Fatal("modifying returned bytes changed the store")
				}
			}
		})
	}
	// What cannot be a manifest, or whose media type is not one, is
	// refused (a pull then fails as a bad response).
	for _, bad := range []struct {
		m    Manifest
		want error
	}{
		{Manifest{MediaType: "x/y", Bytes: []byte{0, 1, 2, 0xff, 0, '\n'}}, ErrBadManifest},
		{Manifest{MediaType: "x/empty", Bytes: []byte{}}, ErrBadManifest},
		{Manifest{MediaType: longest + "x", Bytes: []byte(`{}`)}, ErrBadMediaType},
		{Manifest{MediaType: "not a media type", Bytes: []byte(`{}`)}, ErrBadMediaType},
		{Manifest{MediaType: "text/plain; x=\"", Bytes: []byte(`{}`)}, ErrBadMediaType},
	} {
		m := bad.m
		m.Digest = digest.FromBytes(m.Bytes)
		if err := s.PutManifest(ManifestPut{Manifest: m}); !errors.Is(err, bad.want) {
			t.Errorf("PutManifest(%q, %q) = %v, want %v", m.MediaType, m.Bytes, err, bad.want)
		}
		if _, err := s.GetManifest(m.Digest); !errors.Is(err, ErrNotFound) {
			t.Errorf("a refused manifest is stored: %v", err)
		}
	}
	if _, err := s.GetManifest(digest.FromString("missing")); !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetManifest(missing) = %v, want ErrNotFound", err)
	}
	// Blobs and manifests live under different keys.
	if _, err := s.StatBlob(digest.FromBytes(testManifest)); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a manifest is visible as a blob: %v", err)
	}
}

func TestManifestOrigin(t *testing.T) {
	b := []byte(`{"schemaVersion":2}`)
	d := digest.FromBytes(b)
	type put struct {
		mt string
		o  Origin
	}
	tests := []struct {
		name   string
		puts   []put
		wantMT string
		wantO  Origin
	}{
		{"pulled twice keeps the first", []put{{"a/1", OriginPulled}, {"a/2", OriginPulled}}, "a/1", OriginPulled},
		{"pushed wins over pulled", []put{{"a/1", OriginPulled}, {"a/2", OriginPushed}}, "a/2", OriginPushed},
		{"pulled never replaces pushed", []put{{"a/1", OriginPushed}, {"a/2", OriginPulled}}, "a/1", OriginPushed},
		{"pushed twice keeps the first", []put{{"a/1", OriginPushed}, {"a/2", OriginPushed}}, "a/1", OriginPushed},
		{"pulled pushed pulled", []put{{"a/1", OriginPulled}, {"a/2", OriginPushed}, {"a/3", OriginPulled}}, "a/2", OriginPushed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, _ := newStore(t)
			for _, p := range tt.puts {
				if err := s.PutManifest(ManifestPut{Manifest: Manifest{Digest: d, MediaType: p.mt, Bytes: b, Origin: p.o}}); err != nil {
					t.Fatalf("PutManifest: %v", err)
				}
			}
			got, err := s.GetManifest(d)
			if err != nil {
				t.Fatal(err)
			}
			if got.MediaType != tt.wantMT || got.Origin != tt.wantO {
				t.Fatalf("got %q %v, want %q %v", got.MediaType, got.Origin, tt.wantMT, tt.wantO)
			}
		})
	}
}

func TestPutManifestConcurrent(t *testing.T) {
	s, _ := newStore(t)
	b := []byte(`{"schemaVersion":2,"concurrent":true}`)
	d := digest.FromBytes(b)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	start := make(chan struct{})
	for i := range 16 {
		o := OriginPulled
		if i == 11 {
			o = OriginPushed
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			errs <- s.PutManifest(ManifestPut{Manifest: Manifest{Digest: d, MediaType: mtOCIManifest, Bytes: b, Origin: o}})
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	got, err := s.GetManifest(d)
	if err != nil || got.Origin != OriginPushed {
		t.Fatalf("GetManifest = %+v, %v; want pushed", got, err)
	}
	if lockCount(s) != 0 {
		t.Fatal("keyed lock map not empty")
	}
}

// storeManifest stores a small manifest and returns its digest.
func storeManifest(t *testing.T, s *Store, body string) digest.Digest {
	t.Helper()
	d := digest.FromString(body)
	if err := s.PutManifest(ManifestPut{Manifest: Manifest{Digest: d, MediaType: mtOCIManifest, Bytes: []byte(body), Origin: OriginPulled}}); err != nil {
		t.Fatal(err)
	}
	return d
}

func TestTags(t *testing.T) {
	s, _ := newStore(t)
	at := time.Date(2026, 3, 4, 5, 6, 7, 891011, time.UTC)
	d1 := storeManifest(t, s, `{"n":"one"}`)
	d2 := storeManifest(t, s, `{"n":"two"}`)

	// A tag names a stored manifest, or nothing.
	if err := s.SetTag("docker.io", "library/alpine", "latest", Tag{Digest: digest.FromString("nothing"), FetchedAt: at}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("SetTag to a manifest not stored = %v, want ErrNotFound", err)
	}

	if _, err := s.GetTag("docker.io", "library/alpine", "latest"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetTag(missing) = %v, want ErrNotFound", err)
	}
	if err := s.SetTag("docker.io", "library/alpine", "latest", Tag{Digest: d1, FetchedAt: at}); err != nil {
		t.Fatal(err)
	}
	got, err := s.GetTag("docker.io", "library/alpine", "latest")
	if err != nil {
		t.Fatal(err)
	}
	if got.Digest != d1 || !got.FetchedAt.Equal(at) {
		t.Fatalf("GetTag = %+v, want %s at %v", got, d1, at)
	}

	// Overwrite moves the tag and its FetchedAt.
	later := at.Add(time.Hour)
	if err := s.SetTag("docker.io", "library/alpine", "latest", Tag{Digest: d2, FetchedAt: later}); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.GetTag("docker.io", "library/alpine", "latest"); got.Digest != d2 || !got.FetchedAt.Equal(later) {
		t.Fatalf("after overwrite GetTag = %+v", got)
	}
	// What refers to each manifest moved with the tag.
	if n := countRefs(t, s, d1, refTag); n != 0 {
		t.Fatalf("%d tags still refer to the manifest the tag moved away from", n)
	}
	if n := countRefs(t, s, d2, refTag); n != 1 {
		t.Fatalf("%d tags refer to the tagged manifest, want 1", n)
	}

	// Same repo and tag under another namespace is another tag.
	if _, err := s.GetTag("", "library/alpine", "latest"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("local repo sees the proxied tag: %v", err)
	}
	if _, err := s.GetTag("ghcr.io", "library/alpine", "latest"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("another upstream sees the tag: %v", err)
	}

	if err := s.DeleteTag("docker.io", "library/alpine", "latest"); err != nil {
		t.Fatalf("DeleteTag: %v", err)
	}
	if _, err := s.GetTag("docker.io", "library/alpine", "latest"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetTag after delete = %v, want ErrNotFound", err)
	}
	if err := s.DeleteTag("docker.io", "library/alpine", "latest"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("DeleteTag(deleted) = %v, want ErrNotFound", err)
	}
	if err := s.DeleteTag("docker.io", "library/alpine", "never"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("DeleteTag(missing) = %v, want ErrNotFound", err)
	}
	if tags, err := s.Tags("docker.io", "library/alpine", "", 0); err != nil || len(tags) != 0 {
		t.Fatalf("Tags after delete = %v, %v", tags, err)
	}
	if n := countRefs(t, s, d2, refTag); n != 0 {
		t.Fatalf("%d tags refer to the manifest after the delete", n)
	}
}

// countRefs counts the 'R' keys of d of one kind.
func countRefs(t *testing.T, s *Store, d digest.Digest, kind byte) int {
	t.Helper()
	n := 0
	err := s.ix.view(func(txn *badger.Txn) error {
		refs, err := refsOf(txn, d)
		for _, r := range refs {
			if r.kind == kind {
				n++
			}
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestTagsListing(t *testing.T) {
	s, _ := newStore(t)
	d := storeManifest(t, s, `{"x":1}`)
	// Inserted out of order; lexical (byte) order is what Tags returns.
	tags := []string{"v1.10", "latest", "v1", "V2", "1.0", "v1.2", "v10", "_x", "v1-rc", "a", "latest-alpine"}
	for _, tag := range tags {
		if err := s.SetTag("", "a", tag, Tag{Digest: d}); err != nil {
			t.Fatal(err)
		}
	}
	// Neighbours whose keys share a byte prefix with repo "a".
	neighbours := []struct{ ns, repo string }{
		{"", "a/b"}, {"", "ab"}, {"", "a-"}, {"", "b"}, {"", ""},
		{"a", ""}, {"a", "a"}, {"docker.io", "a"}, {"", "a/a"},
	}
	for _, n := range neighbours {
		for _, tag := range []string{"zz", "latest", "v1", "0"} {
			if err := s.SetTag(n.ns, n.repo, tag, Tag{Digest: d}); err != nil {
				t.Fatal(err)
			}
		}
	}
	want := slices.Clone(tags)
	slices.Sort(want)

	all, err := s.Tags("", "a", "", 0)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(all, want) {
		t.Fatalf("Tags(a) = %v\nwant %v", all, want)
	}
	if all2, _ := s.Tags("", "a", "", -1); !reflect.DeepEqual(all2, want) {
		t.Fatalf("Tags(n=-1) = %v", all2)
	}
	if big, _ := s.Tags("", "a", "", 1000); !reflect.DeepEqual(big, want) {
		t.Fatalf("Tags(n=1000) = %v", big)
	}

	// Pagination with every page size gives the same list, in order.
	for n := 1; n <= len(want)+1; n++ {
		var paged []string
		last := ""
		for page := 0; ; page++ {
			if page > len(want)+1 {
				t.Fatalf("n=%d: pagination does not end", n)
			}
			got, err := s.Tags("", "a", last, n)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) > n {
				t.Fatalf("n=%d: page of %d tags", n, len(got))
			}
			if len(got) == 0 {
				break
			}
			paged = append(paged, got...)
			last = got[len(got)-1]
			if len(got) < n {
				break
			}
		}
		if !reflect.DeepEqual(paged, want) {
			t.Fatalf("n=%d: paged = %v\nwant %v", n, paged, want)
		}
	}

	tests := []struct {
		last string
		n    int
		want []string
	}{
		{"latest", 1, []string{"latest-alpine"}}, // a tag that extends last comes right after it
		{"latest", 0, want[slices.Index(want, "latest")+1:]},
		{"lat", 2, []string{"latest", "latest-alpine"}}, // last need not exist
		{"v1", 3, []string{"v1-rc", "v1.10", "v1.2"}},
		{"v10", 0, nil},
		{"zzz", 0, nil},
		{"", 2, want[:2]},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("last=%s,n=%d", tt.last, tt.n), func(t *testing.T) {
			got, err := s.Tags("", "a", tt.last, tt.n)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("Tags = %v, want %v", got, tt.want)
			}
		})
	}

	for _, n := range neighbours {
		got, err := s.Tags(n.ns, n.repo, "", 0)
		if err != nil {
			t.Fatal(err)
		}
		if w := []string{"0", "latest", "v1", "zz"}; !reflect.DeepEqual(got, w) {
			t.Errorf("Tags(%q, %q) = %v, want %v", n.ns, n.repo, got, w)
		}
	}
	if got, _ := s.Tags("", "nothing", "", 0); len(got) != 0 {
		t.Fatalf("Tags(unknown repo) = %v", got)
	}
	// Deleting a tag of "a" leaves the neighbours alone.
	if err := s.DeleteTag("", "a", "latest"); err != nil {
		t.Fatal(err)
	}
	for _, n := range neighbours {
		if _, err := s.GetTag(n.ns, n.repo, "latest"); err != nil {
			t.Errorf("GetTag(%q, %q, latest) after deleting a:latest = %v", n.ns, n.repo, err)
		}
	}
	if got, _ := s.Tags("", "a", "", 0); slices.Contains(got, "latest") || len(got) != len(want)-1 {
		t.Fatalf("Tags after delete = %v", got)
	}
}

func TestLinks(t *testing.T) {
	s, _ := newStore(t)
	d1 := digest.FromString("1")
	d2 := digest.FromString("2")
	d3 := digest.SHA512.FromString("3")

	linked := func(ns, repo string, d digest.Digest) bool {
		t.Helper()
		ok, err := s.Linked(ns, repo, d)
		if err != nil {
			t.Fatalf("Linked: %v", err)
		}
		return ok
	}

	if linked("", "a", d1) {
		t.Fatal("linked before Link")
	}
	if err := s.Link("", "a"); err != nil {
		t.Fatalf("Link with no digests: %v", err)
	}
	if err := s.Link("", "a", d1, d2, d3); err != nil {
		t.Fatal(err)
	}
	for _, d := range []digest.Digest{d1, d2, d3} {
		if !linked("", "a", d) {
			t.Fatalf("a does not reference %s", d)
		}
	}
	for _, other := range []struct{ ns, repo string }{
		{"", "a/b"}, {"", "ab"}, {"", "b"}, {"docker.io", "a"}, {"a", ""}, {"", ""},
	} {
		if linked(other.ns, other.repo, d1) {
			t.Fatalf("link of a leaks into ns %q repo %q", other.ns, other.repo)
		}
	}
	// Linking again is harmless.
	if err := s.Link("", "a", d1); err != nil {
		t.Fatal(err)
	}
	if err := s.Link("docker.io", "a", d1); err != nil {
		t.Fatal(err)
	}

	if err := s.Unlink("", "a", d1); err != nil {
		t.Fatalf("Unlink: %v", err)
	}
	if linked("", "a", d1) {
		t.Fatal("still linked after Unlink")
	}
	if !linked("", "a", d2) || !linked("docker.io", "a", d1) {
		t.Fatal("Unlink removed more than one link")
	}
	if err := s.Unlink("", "a", d1); err != nil {
		t.Fatalf("Unlink of a missing link: %v", err)
	}
}

func TestReferences(t *testing.T) {
	h := func(c byte) digest.Digest {
		return digest.Digest("sha256:" + string(bytes.Repeat([]byte{c}, 64)))
	}
	tests := []struct {
		name    string
		json    string
		want    []digest.Digest
		subject digest.Digest
	}{
		{"oci manifest", string(testManifest), []digest.Digest{h('1'), h('2'), h('3')}, ""},
		{"docker manifest", `{"schemaVersion":2,"mediaType":"` + mtDockerManifest + `",
			"config":{"digest":"` + string(h('a')) + `"},"layers":[{"digest":"` + string(h('b')) + `"}]}`,
			[]digest.Digest{h('a'), h('b')}, ""},
		{"index", `{"schemaVersion":2,"mediaType":"` + mtOCIIndex + `","manifests":[
			{"mediaType":"` + mtOCIManifest + `","digest":"` + string(h('4')) + `","platform":{"os":"linux","architecture":"amd64"}},
			{"mediaType":"` + mtOCIManifest + `","digest":"` + string(h('5')) + `"}]}`,
			[]digest.Digest{h('4'), h('5')}, ""},
		{"manifest with subject", `{"schemaVersion":2,"config":{"digest":"` + string(h('6')) + `"},
			"layers":[{"digest":"` + string(h('7')) + `"}],"subject":{"digest":"` + string(h('8')) + `"}}`,
			[]digest.Digest{h('6'), h('7')}, h('8')},
		{"index with subject", `{"schemaVersion":2,"manifests":[{"digest":"` + string(h('9')) + `"}],"subject":{"digest":"` + string(h('c')) + `"}}`,
			[]digest.Digest{h('9')}, h('c')},
		{"artifact blobs", `{"artifactType":"x","blobs":[{"digest":"` + string(h('d')) + `"},{"digest":"` + string(h('e')) + `"}]}`,
			[]digest.Digest{h('d'), h('e')}, ""},
		{"non-distributable layers are not held", `{"config":{"digest":"` + string(h('1')) + `"},"layers":[
			{"mediaType":"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip","digest":"` + string(h('2')) + `"},
			{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"` + string(h('3')) + `"},
			{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"` + string(h('4')) + `"}]}`,
			[]digest.Digest{h('1'), h('4')}, ""},
		{"duplicates held once", `{"config":{"digest":"` + string(h('1')) + `"},"layers":[{"digest":"` + string(h('1')) + `"},{"digest":"` + string(h('2')) + `"},{"digest":"` + string(h('2')) + `"}]}`,
			[]digest.Digest{h('1'), h('2')}, ""},
		{"docker schema 1", `{"schemaVersion":1,"fsLayers":[{"blobSum":"` + string(h('a')) + `"}]}`, []digest.Digest{h('a')}, ""},
		{"empty descriptors skipped", `{"config":{},"layers":[{"digest":""},{"size":3}],"subject":null}`, nil, ""},
		{"no references", `{"schemaVersion":2}`, nil, ""},
		{"null", `null`, nil, ""},
		{"unknown fields ignored", `{"foo":[1,2],"layers":[{"digest":"` + string(h('f')) + `","urls":["http://x"]}]}`, []digest.Digest{h('f')}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			held, subject, err := References([]byte(tt.json))
			if err != nil {
				t.Fatalf("References: %v", err)
			}
			var got []digest.Digest
			for _, r := range held {
				got = append(got, r.Digest)
			}
			if !reflect.DeepEqual(got, tt.want) || subject != tt.subject {
				t.Fatalf("got %v, subject %q\nwant %v, subject %q", got, subject, tt.want, tt.subject)
			}
		})
	}

	for _, bad := range []string{``, `{`, `not json`, `{"layers":{}}`, `{"config":"sha256:x"}`, `[1,2]`, `{"layers":[{"digest":1}]}`,
		`{"layers":[{"digest":"sha256:abc"}]}`, `{"config":{"digest":"md5:` + strings.Repeat("a", 32) + `"}}`,
		`{"subject":{"digest":"sha256:\u0000` + strings.Repeat("a", 63) + `"}}`} {
		t.Run("invalid "+bad, func(t *testing.T) {
			if held, subject, err := References([]byte(bad)); !errors.Is(err, ErrBadManifest) {
				t.Fatalf("References(%q) = %v, %q, %v; want ErrBadManifest", bad, held, subject, err)
			}
		})
	}
}

// Everything the index holds survives Close and Open on the same dir.
func TestStoreReopen(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	blob := testBytes(100<<10, 20)
	bd := digest.FromBytes(blob)
	md := digest.FromBytes(testManifest)
	at := time.Date(2026, 5, 6, 7, 8, 9, 10, time.UTC)
	if err := s.PutBlob(bytes.NewReader(blob), bd, OriginPushed); err != nil {
		t.Fatal(err)
	}
	if err := s.PutManifest(ManifestPut{Manifest: Manifest{Digest: md, MediaType: mtOCIManifest, Bytes: testManifest, Origin: OriginPulled}}); err != nil {
		t.Fatal(err)
	}
	if err := s.SetTag("docker.io", "library/busybox", "1.36", Tag{Digest: md, FetchedAt: at}); err != nil {
		t.Fatal(err)
	}
	if err := s.Link("docker.io", "library/busybox", bd, md); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}

	s2, err := Open(dir, Options{})
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer func() {
		if err := s2.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	}()
	if s2.Dir() != dir {
		t.Fatalf("Dir = %q, want %q", s2.Dir(), dir)
	}
	got, info := readBlob(t, s2, bd)
	if !bytes.Equal(got, blob) || info.Origin != OriginPushed || info.Size != int64(len(blob)) {
		t.Fatalf("blob after reopen: %d bytes, %+v", len(got), info)
	}
	m, err := s2.GetManifest(md)
	if err != nil || !bytes.Equal(m.Bytes, testManifest) || m.MediaType != mtOCIManifest || m.Origin != OriginPulled {
		t.Fatalf("manifest after reopen: %+v, %v", m, err)
	}
	tag, err := s2.GetTag("docker.io", "library/busybox", "1.36")
	if err != nil || tag.Digest != md || !tag.FetchedAt.Equal(at) {
		t.Fatalf("tag after reopen: %+v, %v", tag, err)
	}
	if tags, _ := s2.Tags("docker.io", "library/busybox", "", 0); !reflect.DeepEqual(tags, []string{"1.36"}) {
		t.Fatalf("Tags after reopen = %v", tags)
	}
	for _, d := range []digest.Digest{bd, md} {
		if ok, err := s2.Linked("docker.io", "library/busybox", d); err != nil || !ok {
			t.Fatalf("link to %s after reopen: %v, %v", d, ok, err)
		}
	}
	assertTmpEmpty(t, dir)
	// The reopened store keeps working.
	if err := s2.PutBlob(bytes.NewReader([]byte("more")), digest.FromString("more"), OriginPulled); err != nil {
		t.Fatal(err)
	}
}
