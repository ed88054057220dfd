package mirror

import (
	"math"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

// Fuzz targets. `go test` runs their seeds (here and in testdata/fuzz) as
// ordinary tests; `bash .ci/fuzz` fuzzes each for a bounded time.

// The distribution spec's grammar, as the spec writes it: the oracle of
// the hand-written validName and validTag.
var (
	nameRe = regexp.MustCompile(`^[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*)*$`)
	tagRe  = regexp.MustCompile(`^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$`)
)

// nameCases are names and tags of every shape the grammar has an opinion on.
var nameCases = []string{
	"", "a", "A", "alpine", "library/alpine", "a/b/c", "a-b", "a--b", "a---b", "a_b", "a__b", "a___b",
	"a.b", "a..b", "a._b", "a_.b", "a-.b", "a.-b", "a-_b", "-a", "a-", "_a", "a_", ".a", "a.", "/a", "a/",
	"a//b", "a/-b", "a/b-", "0", "9z", "ab.c-d_e__f", "a b", "a\x00b", "é", "a/b/c/d/e/f/g/h", "UPPER",
	"v1.2.3", "v1.2.3-rc.1_x", "_", "__", "-", ".", strings.Repeat("a", 128), strings.Repeat("a", 129),
	"sha256-" + strings.Repeat("0", 64), "a:b", "a@b", "a+b",
}

// validName and validTag say what the spec's regexps say.
func TestValidNameAndTagAreTheGrammar(t *testing.T) {
	for _, s := range nameCases {
		checkNameAndTag(t, s)
	}
}

func FuzzValidNameAndTag(f *testing.F) {
	for _, s := range nameCases {
		f.Add(s)
	}
	f.Fuzz(checkNameAndTag)
}

func checkNameAndTag(t *testing.T, s string) {
	if got, want := validName(s), nameRe.MatchString(s); got != want {
		t.Errorf("validName(%q) = %v, the grammar says %v", s, got, want)
	}
	if got, want := validTag(s), tagRe.MatchString(s); got != want {
		t.Errorf("validTag(%q) = %v, the grammar says %v", s, got, want)
	}
}

func FuzzParseRoute(f *testing.F) {
	d := "sha256:" + strings.Repeat("a", 64)
	for _, s := range []string{
		"/v2/", "/v2", "/v2/_catalog", "/v2/library/alpine/manifests/3", "/v2/a/b/c/manifests/" + d,
		"/v2/a/blobs/" + d, "/v2/a/blobs/uploads/", "/v2/a/blobs/uploads", "/v2/a/blobs/uploads/abc-DEF_1",
		"/v2/a/tags/list", "/v2/a/referrers/" + d, "/v2/a/../b/manifests/x", "/v2//manifests/x",
		"/v2/a/manifests/", "/v2/a/blobs/md5:abc", "/v2/manifests/manifests/manifests", "/v2/a/blobs/blobs/" + d,
		"/v2/" + strings.Repeat("a/", 200) + "manifests/x", "/v2/a/manifests/x\x00y", "/v3/a/manifests/b",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, path string) {
		r, err := parseRoute(path)
		if err != nil {
			if _, ok := err.(*ociError); !ok {
				t.Fatalf("%q: error %T is not an OCI error", path, err)
			}
			return
		}
		switch r.kind {
		case routeBase, routeCatalog:
			return
		}
		if p := routePath(r); p != path && p+"/" != path {
			t.Fatalf("%q: read as %+v, which is %q", path, r, p)
		}
		if len(r.name) > maxNameLen || !nameRe.MatchString(r.name) {
			t.Fatalf("%q: accepted name %q", path, r.name)
		}
		if strings.Contains(r.name, "..") || strings.HasPrefix(r.name, "/") {
			t.Fatalf("%q: traversal in name %q", path, r.name)
		}
		switch r.kind {
		case routeBlob, routeReferrers:
			checkDigest(t, path, r.digest)
		case routeManifest:
			if r.digest != "" {
				checkDigest(t, path, r.digest)
			} else if !tagRe.MatchString(r.ref) {
				t.Fatalf("%q: accepted tag %q", path, r.ref)
			}
		case routeUpload:
			if !idRe.MatchString(r.upload) {
				t.Fatalf("%q: accepted upload id %q", path, r.upload)
			}
		}
	})
}

// routePath is the path of r: the name and the route's own segments (an
// upload session's start may also end in a slash).
func routePath(r route) string {
	tail := map[routeKind]string{routeManifest: "manifests/" + r.ref, routeBlob: "blobs/" + string(r.digest),
		routeUploads: "blobs/uploads", routeUpload: "blobs/uploads/" + r.upload, routeTags: "tags/list",
		routeReferrers: "referrers/" + string(r.digest)}[r.kind]
	return "/v2/" + r.name + "/" + tail
}

func checkDigest(t *testing.T, path string, d digest.Digest) {
	t.Helper()
	if d.Validate() != nil || (d.Algorithm() != digest.SHA256 && d.Algorithm() != digest.SHA512) {
		t.Fatalf("%q: accepted digest %q", path, d)
	}
	if strings.ContainsAny(d.Encoded(), "/.") {
		t.Fatalf("%q: digest %q could name a path", path, d)
	}
}

func FuzzChunkRange(f *testing.F) {
	for _, s := range []string{"0-99", "bytes 0-99/100", "100-199", "5-4", "-1-3", "0-", "a-b", "",
		"0-9223372036854775807", "9223372036854775807-9223372036854775807", "1-2-3", " 0-0 "} {
		f.Add(s, int64(100))
		f.Add(s, int64(-1))
	}
	f.Fuzz(func(t *testing.T, header string, contentLength int64) {
		req, _ := http.NewRequest(http.MethodPatch, "/", nil)
		if header != "" {
			req.Header.Set("Content-Range", header)
		}
		req.ContentLength = contentLength
		start, length, err := chunkRange(req)
		if err != nil {
			if _, ok := err.(*ociError); !ok {
				t.Fatalf("%q: error %T is not an OCI error", header, err)
			}
			return
		}
		if req.Header.Get("Content-Range") == "" {
			return
		}
		if start < 0 || length <= 0 || start > math.MaxInt64-length {
			t.Fatalf("%q (Content-Length %d): start %d, length %d", header, contentLength, start, length)
		}
		if contentLength >= 0 && length != contentLength {
			t.Fatalf("%q: length %d disagrees with Content-Length %d", header, length, contentLength)
		}
		_ = strconv.Itoa(0)
	})
}
