package push

import (
	"errors"
	"testing"
)

// FuzzParseManifest: any body and Content-Type gives a manifest whose every
// digest is valid, or ErrManifestInvalid; never a panic.
func FuzzParseManifest(f *testing.F) {
	d := "sha256:" + "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	for _, s := range []struct{ ct, body string }{
		{"application/vnd.oci.image.manifest.v1+json", `{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"` + d + `","size":2},"layers":[{"digest":"` + d + `","size":3}]}`},
		{"application/vnd.oci.image.index.v1+json", `{"schemaVersion":2,"manifests":[{"digest":"` + d + `","size":3}]}`},
		{"", `{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"digest":"` + d + `"}}`},
		{"application/json; charset=utf-8", `{"schemaVersion":2,"subject":{"digest":"sha256:xyz"}}`},
		{"text/plain", `{}`},
		{"application/vnd.oci.image.manifest.v1+json", `{"schemaVersion":2,"config":{"digest":"` + d + `","size":-1}}`},
		{";;;", `not json`},
		{"", ``},
	} {
		f.Add(s.ct, []byte(s.body))
	}
	f.Fuzz(func(t *testing.T, ct string, body []byte) {
		man, mt, err := parseManifest(ct, body)
		if err != nil {
			if !errors.Is(err, ErrManifestInvalid) {
				t.Fatalf("error not ErrManifestInvalid: %v", err)
			}
			return
		}
		if mt == "" {
			t.Fatal("accepted without a media type")
		}
		all := append(append([]descriptor{}, man.Layers...), man.Manifests...)
		if man.Config != nil {
			all = append(all, *man.Config)
		}
		if man.Subject != nil {
			all = append(all, *man.Subject)
		}
		for _, d := range all {
			if d.Digest.Validate() != nil || d.Size < 0 {
				t.Fatalf("accepted descriptor %+v", d)
			}
		}
	})
}
