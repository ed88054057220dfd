package cache

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// imageManifest is an OCI image manifest with a config of cfg bytes and
// one layer of layer bytes (digests made from seed).
func imageManifest(seed string, cfg, layer int64) []byte {
	return fmt.Appendf(nil, `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",`+
		`"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},`+
		`"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"%s","size":%d}]}`,
		digest.FromString("config "+seed), cfg, digest.FromString("layer "+seed), layer)
}

func putPulled(t testing.TB, s *Store, ns, repo string, b []byte, mt string, tags ...string) digest.Digest {
	t.Helper()
	d := digest.FromBytes(b)
	err := s.PutManifest(ManifestPut{NS: ns, Repo: repo, Tags: tags,
		Manifest: Manifest{Digest: d, MediaType: mt, Bytes: b, Origin: OriginPulled}})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestTagPageRowsHaveSizeAndLastUse(t *testing.T) {
	c := &clock{now: time.Unix(1_800_000_000, 0)}
	s, _ := newStoreOpts(t, Options{Now: c.Now})
	amd := imageManifest("amd64", 100, 1000)
	arm := imageManifest("arm64", 100, 2000)
	dAmd := putPulled(t, s, "up.example", "team/app", amd, mtOCIManifest)
	dArm := putPulled(t, s, "up.example", "team/app", arm, mtOCIManifest)
	idx := fmt.Appendf(nil, `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[`+
		`{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%d},`+
		`{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%d}]}`, dAmd, len(amd), dArm, len(arm))
	c.Add(time.Minute)
	dIdx := putPulled(t, s, "up.example", "team/app", idx, mtOCIIndex, "v1", "latest")
	dImg := putPulled(t, s, "", "ci/tool", imageManifest("tool", 10, 20), mtOCIManifest, "main")

	page, err := s.TagPage(TagQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if page.Next != "" || page.Partial || page.Scanned != 3 || len(page.Rows) != 3 {
		t.Fatalf("page %+v: want 3 rows and nothing after", page)
	}
	local, v1 := page.Rows[0], page.Rows[2]
	if local.NS != "" || local.Repo != "ci/tool" || local.Tag != "main" || local.Digest != dImg {
		t.Errorf("first row %+v: want the local repository's tag first", local)
	}
	if page.Rows[1].Tag != "latest" || v1.Tag != "v1" || v1.NS != "up.example" || v1.Repo != "team/app" || v1.Digest != dIdx {
		t.Errorf("rows %+v", page.Rows)
	}
	// The index, both children, and their configs and layers.
	want := int64(len(idx)+len(amd)+len(arm)) + 100 + 1000 + 100 + 2000
	if v1.Size != want || !v1.Stored || v1.MediaType != mtOCIIndex || v1.Origin != OriginPulled {
		t.Errorf("v1: size %d stored %v type %q origin %v; want size %d of a stored pulled index", v1.Size, v1.Stored, v1.MediaType, v1.Origin, want)
	}
	if !v1.FetchedAt.Equal(c.Now()) || !v1.LastUse.Equal(c.Now()) {
		t.Errorf("v1 fetched %v, last used %v; want both %v", v1.FetchedAt, v1.LastUse, c.Now())
	}

	// A use after the put shows, before it reaches the index.
	c.Add(time.Hour)
	s.Touch(dIdx)
	page, _ = s.TagPage(TagQuery{Search: "team/app:v1"})
	if len(page.Rows) != 1 || !page.Rows[0].LastUse.Equal(c.Now()) {
		t.Errorf("after a use: %+v", page.Rows)
	}

	// A tag whose manifest is gone (evicted) is listed, not stored.
	if err := s.ix.update(func(txn *badger.Txn) error { return txn.Delete(keyManifest(dImg)) }); err != nil {
		t.Fatal(err)
	}
	page, _ = s.TagPage(TagQuery{Search: "ci/"})
	if len(page.Rows) != 1 || page.Rows[0].Stored || page.Rows[0].Size != 0 || page.Rows[0].Digest != dImg {
		t.Errorf("a tag of an evicted manifest: %+v", page.Rows)
	}
}

// seedTags points n tags, spread over repositories of 100 tags under two
// upstreams and the local namespace, at a few stored manifests, in
// transactions of 2,000 tags.
func seedTags(t testing.TB, s *Store, n int) {
	t.Helper()
	var ds []digest.Digest
	for i := range 8 {
		ds = append(ds, putPulled(t, s, "", "", imageManifest(fmt.Sprint(i), 1000, int64(i+1)<<20), mtOCIManifest))
	}
	at := time.Unix(1_800_000_000, 0)
	for lo := 0; lo < n; lo += 2000 {
		err := s.ix.update(func(txn *badger.Txn) error {
			for i := lo; i < min(lo+2000, n); i++ {
				ns := []string{"", "registry-1.docker.io", "ghcr.io"}[i%3]
				repo := fmt.Sprintf("org%03d/app%03d", i/100_00, i/100)
				if err := setTag(txn, ns, repo, fmt.Sprintf("v%06d", i), Tag{Digest: ds[i%len(ds)], FetchedAt: at}); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

func TestTagPagePagesWithACursorAndSearches(t *testing.T) {
	s, _ := newStore(t)
	const n = 1000
	seedTags(t, s, n)

	var all []string
	after := ""
	for pages := 0; ; pages++ {
		if pages > n/7+1 {
			t.Fatal("paging does not end")
		}
		p, err := s.TagPage(TagQuery{After: after, Limit: 7})
		if err != nil {
			t.Fatal(err)
		}
		if len(p.Rows) > 7 || (p.Next != "" && len(p.Rows) != 7) {
			t.Fatalf("page %d: %d rows, next %q", pages, len(p.Rows), p.Next)
		}
		for _, r := range p.Rows {
			all = append(all, r.NS+"/"+r.Repo+":"+r.Tag)
		}
		if p.Next == "" {
			break
		}
		after = p.Next
	}
	if len(all) != n || !slices.IsSorted(all) || len(slices.Compact(slices.Clone(all))) != n {
		t.Fatalf("paging gave %d tags (sorted %v), want each of %d once, in order", len(all), slices.IsSorted(all), n)
	}

	// Search ignores case and matches across the separators; pages of a
	// search go on from the cursor.
	p, err := s.TagPage(TagQuery{Search: "GHCR.io/org000/APP001:V0001", Limit: 3})
	if err != nil {
		t.Fatal(err)
	}
	got := []string{}
	for _, r := range p.Rows {
		got = append(got, r.Tag)
	}
	if want := []string{"v000101", "v000104", "v000107"}; !slices.Equal(got, want) || p.Next == "" {
		t.Fatalf("search: %v next %q, want %v and a next page", got, p.Next, want)
	}
	p, _ = s.TagPage(TagQuery{Search: "ghcr.io/org000/app001:v0001", Limit: 3, After: p.Next})
	if len(p.Rows) != 3 || p.Rows[0].Tag != "v000110" || p.Rows[2].Tag != "v000116" {
		t.Fatalf("second page of a search: %+v", p.Rows)
	}

	// A search that matches nothing looks at MaxScan keys, then says so and
	// where to go on.
	p, _ = s.TagPage(TagQuery{Search: "nothing-matches", MaxScan: 300})
	if len(p.Rows) != 0 || !p.Partial || p.Scanned != 300 || p.Next == "" {
		t.Fatalf("bounded search: %+v", p)
	}
	p, _ = s.TagPage(TagQuery{Search: "nothing-matches", MaxScan: 300, After: p.Next})
	if p.Scanned != 300 || !p.Partial {
		t.Fatalf("its next page: %+v", p)
	}
	p, _ = s.TagPage(TagQuery{Search: "nothing-matches"})
	if p.Partial || p.Next != "" || p.Scanned != n {
		t.Fatalf("unbounded: %+v", p)
	}

	// Hostile search strings are only strings.
	for _, q := range []string{"\x00", "%", ".*", "\xff\xfe", strings.Repeat("a", 10_000), "' OR 1=1"} {
		if p, err := s.TagPage(TagQuery{Search: q}); err != nil || len(p.Rows) != 0 {
			t.Errorf("search %q: %v, %d rows", q, err, len(p.Rows))
		}
	}
	if p, _ := s.TagPage(TagQuery{Limit: 1 << 30}); len(p.Rows) != MaxTagPage {
		t.Errorf("a huge limit gave %d rows, want at most %d", len(p.Rows), MaxTagPage)
	}
}

func TestTagPageRefusesBadCursors(t *testing.T) {
	s, _ := newStore(t)
	seedTags(t, s, 10)
	for _, c := range []string{"!!", "a b", "AAAA", "dGFn", strings.Repeat("A", maxCursor+4), encodeCursor([]byte("tonly\x00two"))} {
		if _, err := s.TagPage(TagQuery{After: c}); !errors.Is(err, ErrBadCursor) {
			t.Errorf("cursor %q: %v, want ErrBadCursor", c[:min(len(c), 20)], err)
		}
	}
	// A cursor past the last key is an empty page, not an error.
	if p, err := s.TagPage(TagQuery{After: encodeCursor([]byte("t\xff\x00z\x00z"))}); err != nil || len(p.Rows) != 0 || p.Next != "" {
		t.Errorf("a cursor past the end: %+v, %v", p, err)
	}
}

// BenchmarkTagPage seeds 100,000 tags and times a first page, a page deep
// in the list, and searches:
//
//	go test -run '^$' -bench TagPage -benchtime 200x ./cache
func BenchmarkTagPage(b *testing.B) {
	s, err := Open(b.TempDir(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	const n = 100_000
	seedTags(b, s, n)
	mid, _ := s.TagPage(TagQuery{Search: "org004/app499:", Limit: 1})
	if len(mid.Rows) != 1 {
		b.Fatalf("no tag in the middle: %+v", mid)
	}
	deep := encodeCursor(keyTag(mid.Rows[0].NS, mid.Rows[0].Repo, mid.Rows[0].Tag))
	for _, bc := range []struct {
		name string
		q    TagQuery
		rows int
	}{
		{"first-page", TagQuery{}, DefaultTagPage},
		{"page-at-50000", TagQuery{After: deep}, DefaultTagPage},
		{"search-one-repo", TagQuery{Search: "ghcr.io/org007/app777:"}, 33},
		{"search-no-match", TagQuery{Search: "no-such-image"}, 0},
		{"search-every-100th", TagQuery{Search: "00:"}, DefaultTagPage},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var p TagPage
			for b.Loop() {
				if p, err = s.TagPage(bc.q); err != nil {
					b.Fatal(err)
				}
			}
			if len(p.Rows) != bc.rows {
				b.Fatalf("%d rows, want %d", len(p.Rows), bc.rows)
			}
			b.ReportMetric(float64(p.Scanned), "keys/op")
		})
	}
}
