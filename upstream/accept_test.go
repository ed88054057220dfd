package upstream

import (
	"mime"
	"strings"
	"testing"
)

// mediaRangeCases are Accept entries of every shape: what clients send,
// and what mime.ParseMediaType refuses or rewrites.
var mediaRangeCases = []string{
	"application/vnd.oci.image.manifest.v1+json",
	"  application/vnd.docker.distribution.manifest.v2+json ",
	"application/vnd.oci.image.index.v1+json; q=0.5",
	"application/vnd.oci.image.index.v1+json;q=0.5;",
	"application/vnd.oci.image.index.v1+json; q",
	"Application/VND.OCI.Image.Manifest.v1+JSON",
	"*/*", "application/*", "*", "text", "a/b/c", "/json", "application/", "",
	"application/json\t", "application/js on", "application/j\"son", "applic@tion/json",
	"application/jsön", "application/json\x00", "\u00a0application/json",
}

// MediaRange reads an entry exactly as mime.ParseMediaType does.
func TestMediaRangeIsParseMediaType(t *testing.T) {
	for _, a := range mediaRangeCases {
		checkMediaRange(t, a)
	}
}

func FuzzMediaRange(f *testing.F) {
	for _, a := range mediaRangeCases {
		f.Add(a)
	}
	f.Fuzz(checkMediaRange)
}

func checkMediaRange(t *testing.T, a string) {
	want, _, err := mime.ParseMediaType(strings.TrimSpace(a))
	got, ok := MediaRange(a)
	if ok != (err == nil) || (ok && got != want) {
		t.Errorf("MediaRange(%q) = %q, %v; mime.ParseMediaType: %q, %v", a, got, ok, want, err)
	}
}

func TestAcceptable(t *testing.T) {
	const oci = "application/vnd.oci.image.manifest.v1+json"
	for _, c := range []struct {
		accept []string
		want   bool
	}{
		{nil, true},
		{[]string{oci}, true},
		{[]string{"application/vnd.oci.image.index.v1+json"}, false},
		{[]string{"application/vnd.oci.image.index.v1+json", " " + oci + "; q=0.9"}, true},
		{[]string{"APPLICATION/VND.OCI.IMAGE.MANIFEST.V1+JSON"}, true},
		{[]string{"application/*"}, true},
		{[]string{"text/*"}, false},
		{[]string{"*/*"}, true},
		{[]string{"garbage/"}, false},
	} {
		if got := Acceptable(oci, c.accept); got != c.want {
			t.Errorf("Acceptable(%q, %q) = %v", oci, c.accept, got)
		}
	}
}
