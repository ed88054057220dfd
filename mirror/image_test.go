package mirror

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/random"
)

const testDigest = "sha256:0f5fd30b7e2db5f1d7d2ccb62e0d8e1c3d6f9b07a6c9f7f9b0e9d3f7f1a2b3c4"

func TestParseImage(t *testing.T) {
	for _, c := range []struct {
		in   string
		want ImageRef
	}{
		{"alpine", ImageRef{Name: "alpine", Ref: "latest"}},
		{"alpine:3.20", ImageRef{Name: "alpine", Ref: "3.20"}},
		{"alpine:3.20@" + testDigest, ImageRef{Name: "alpine", Ref: testDigest}},
		{"team/app@" + testDigest, ImageRef{Name: "team/app", Ref: testDigest}},
		{"ghcr.io/org/app:v1", ImageRef{Name: "ghcr.io/org/app", Ref: "v1"}},
		{"up/team/multi:v1", ImageRef{Name: "up/team/multi", Ref: "v1"}},
		{"hub/alpine", ImageRef{Name: "hub/alpine", Ref: "latest"}},
		{"localhost/x:y", ImageRef{Name: "localhost/x", Ref: "y"}},
		{"localhost:5000/x:y", ImageRef{NS: "localhost:5000", Name: "x", Ref: "y"}},
		{"127.0.0.1:5001/team/app@" + testDigest, ImageRef{NS: "127.0.0.1:5001", Name: "team/app", Ref: testDigest}},
		{"[::1]:5000/a/b:c", ImageRef{NS: "[::1]:5000", Name: "a/b", Ref: "c"}},
		{"docker.io/alpine:3", ImageRef{Name: "index.docker.io/library/alpine", Ref: "3"}},
		{"a/b/c/d:V1_x.y-z", ImageRef{Name: "a/b/c/d", Ref: "V1_x.y-z"}},
		{"alpine@sha512:" + strings.Repeat("ab", 64), ImageRef{Name: "alpine", Ref: "sha512:" + strings.Repeat("ab", 64)}},
	} {
		got, err := ParseImage(c.in)
		if err != nil || got != c.want {
			t.Errorf("ParseImage(%q) = %+v, %v; want %+v", c.in, got, err, c.want)
		}
	}
	for in, code := range badImages {
		_, err := ParseImage(in)
		var oe *ociError
		if !errors.As(err, &oe) || oe.code.name != code || oe.code.status != http.StatusBadRequest || !strings.Contains(oe.message, in) {
			t.Errorf("ParseImage(%q) = %v, want a 400 %s naming the image", in, err, code)
		}
	}
}

// badImages are references that do not parse, with their OCI codes.
var badImages = map[string]string{
	"":                                      "NAME_INVALID",
	"Alpine:3":                              "NAME_INVALID",
	"alpine:":                               "NAME_INVALID",
	"alpine:bad!tag":                        "NAME_INVALID",
	"alpine:.hidden":                        "TAG_INVALID",
	"alpine:-x":                             "TAG_INVALID",
	"alpine:" + strings.Repeat("t", 129):    "NAME_INVALID",
	"alpine@":                               "DIGEST_INVALID",
	"alpine@sha256:abc":                     "DIGEST_INVALID",
	"alpine@md5:" + strings.Repeat("a", 32): "DIGEST_INVALID",
	"alpine@sha384:" + strings.Repeat("a", 96): "DIGEST_INVALID",
	"a@b@" + testDigest:                        "DIGEST_INVALID",
	"@" + testDigest:                           "NAME_INVALID",
	"team//app:v1":                             "NAME_INVALID",
	"team/app-:v1":                             "NAME_INVALID",
	"-team/app":                                "NAME_INVALID",
	"team/app/":                                "NAME_INVALID",
	"https://ghcr.io/org/app:v1":               "NAME_INVALID",
	"alpine 3.20":                              "NAME_INVALID",
	"localhost:5000/X:y":                       "NAME_INVALID",
	"localhost:5000/:y":                        "NAME_INVALID",
	"local host:5000/x":                        "NAME_INVALID",
	strings.Repeat("a", 256):                   "NAME_INVALID",
}

// The prefetch API reads references as the CLI does (ParseImage): a tag
// with a digest, an upstream named by host:port; a reference that does not
// parse fails the whole call with a 400 OCI error before any upstream
// request.
func TestAdminPrefetchReferences(t *testing.T) {
	e := newOpsEnv(t, nil)
	img, _ := random.Image(1024, 1)
	e.up.pushImageTo(t, img, "team/single:v1")
	d, _ := img.Digest()
	url := e.url("/v2/_slipway/prefetch")

	for _, images := range [][]string{
		{"up/team/single:v1@" + d.String()},
		{"up/team/single@" + d.String()},
		{e.up.host + "/team/single:v1"},
		{strings.ToUpper(e.up.host[:1]) + e.up.host[1:] + "/team/single@" + d.String()},
	} {
		status, res := postPrefetchReq(t, url, map[string]any{"images": images})
		if status != http.StatusOK || len(res) != 1 || res[0].Error != "" || res[0].Manifests != 1 || res[0].Blobs != 2 {
			t.Errorf("prefetch %q: %d %+v, want 200 with 1 manifest and 2 blobs", images, status, res)
		}
	}
	// The image's host:port and ?ns= must agree.
	status, res := postPrefetchReq(t, url+"?ns="+e.up.host, map[string]any{"images": []string{e.up.host + "/team/single:v1", "team/single:v1"}})
	if status != http.StatusOK || len(res) != 2 || res[0].Error != "" || res[1].Error != "" {
		t.Errorf("prefetch with ?ns= the image's own host: %d %+v", status, res)
	}
	// An upstream that is not configured is that image's 404, as for a pull.
	status, res = postPrefetchReq(t, url, map[string]any{"images": []string{"127.0.0.9:1/team/single:v1", "up/team/single:v1"}})
	if status != http.StatusBadGateway || len(res) != 2 || !strings.Contains(res[0].Error, "NAME_UNKNOWN") || res[1].Error != "" {
		t.Errorf("prefetch from an unknown host:port: %d %+v, want 502 with that image's NAME_UNKNOWN", status, res)
	}

	before := e.up.total()
	cases := map[string]string{"127.0.0.9:1/team/single:v1?ns=" + e.up.host: "NAME_INVALID"}
	for in, code := range badImages {
		cases[in] = code
	}
	for in, code := range cases {
		target, image := url, in
		if i := strings.Index(in, "?ns="); i >= 0 {
			target, image = url+in[i:], in[:i]
		}
		// A bad reference after a good one: nothing is fetched.
		b, _ := json.Marshal(map[string]any{"images": []string{"up/team/single:v1", image}})
		resp, err := http.Post(target, "application/json", bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var oe struct {
			Errors []struct{ Code, Message string }
		}
		if resp.StatusCode != http.StatusBadRequest || json.Unmarshal(body, &oe) != nil || len(oe.Errors) != 1 ||
			oe.Errors[0].Code != code || !strings.Contains(oe.Errors[0].Message, image) {
			t.Errorf("prefetch %q: %d %s, want 400 with one %s naming the image", in, resp.StatusCode, body, code)
		}
	}
	if n := e.up.total() - before; n != 0 {
		t.Errorf("calls with a bad reference made %d upstream requests", n)
	}
}

func FuzzParseImage(f *testing.F) {
	for _, s := range []string{"alpine", "alpine:3.20@" + testDigest, "ghcr.io/org/app:v1", "localhost:5000/x:y",
		"https://ghcr.io/a", "a@b@c", "[::1]:5000/a/b:c", "docker.io/alpine", "x:y:z", "a/b@sha512:" + strings.Repeat("ab", 64)} {
		f.Add(s)
	}
	for in := range badImages {
		f.Add(in)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseImage(s)
		if err != nil {
			var oe *ociError
			if !errors.As(err, &oe) || oe.code.status != http.StatusBadRequest {
				t.Fatalf("%q: error %v is not a 400 OCI error", s, err)
			}
			return
		}
		if validateName(r.Name) != nil || strings.Contains(r.Name, "..") {
			t.Fatalf("%q: accepted name %q", s, r.Name)
		}
		if strings.Contains(r.Ref, ":") {
			if _, err := parseDigest(r.Ref); err != nil {
				t.Fatalf("%q: accepted digest %q", s, r.Ref)
			}
		} else if !tagRe.MatchString(r.Ref) {
			t.Fatalf("%q: accepted tag %q", s, r.Ref)
		}
		if r.NS != "" && !strings.Contains(r.NS, ":") {
			t.Fatalf("%q: ns %q without a port", s, r.NS)
		}
		// What a client sends for it reads back the same.
		sep := ":"
		if strings.Contains(r.Ref, ":") {
			sep = "@"
		}
		again := r.Name + sep + r.Ref
		if r.NS != "" {
			again = r.NS + "/" + again
		}
		if r2, err := ParseImage(again); err != nil || r2 != r {
			t.Fatalf("%q -> %+v -> %q -> %+v, %v", s, r, again, r2, err)
		}
	})
}
