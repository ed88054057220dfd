package mirror

import (
	"regexp"
	"strings"

	"github.com/opencontainers/go-digest"
)

type routeKind int

const (
	routeBase      routeKind = iota // /v2/
	routeCatalog                    // /v2/_catalog
	routeManifest                   // /v2/<name>/manifests/<reference>
	routeBlob                       // /v2/<name>/blobs/<digest>
	routeUploads                    // /v2/<name>/blobs/uploads/
	routeUpload                     // /v2/<name>/blobs/uploads/<id>
	routeTags                       // /v2/<name>/tags/list
	routeReferrers                  // /v2/<name>/referrers/<digest>
)

func (k routeKind) String() string {
	return [...]string{"base", "catalog", "manifest", "blob", "uploads", "upload", "tags", "referrers"}[k]
}

// route is a parsed /v2/ path.
type route struct {
	kind   routeKind
	name   string        // repository name as the client sent it
	ref    string        // manifest reference: a tag or a digest
	digest digest.Digest // blob or referrers digest; manifest digest when ref is one
	upload string        // upload session id
}

// An upload id: "<replica>.<hex>" in a fleet.
var idRe = regexp.MustCompile(`^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$`)

const maxNameLen = 255

// parseRoute reads a decoded URL path from its tail, so repository names
// with any number of slashes just work: .../manifests/<ref>,
// .../blobs/uploads/<id>, .../blobs/<digest>, .../tags/list,
// .../referrers/<digest>.
func parseRoute(path string) (route, error) {
	if path == "/v2" || path == "/v2/" {
		return route{kind: routeBase}, nil
	}
	rest, ok := strings.CutPrefix(path, "/v2/")
	if !ok {
		return route{}, errRouteUnknown
	}
	if rest == "_catalog" {
		return route{kind: routeCatalog}, nil
	}
	// The last three segments (s1 the last) and what is before each (h1
	// before s1, without the slash), cut from the tail: the name is what
	// comes before the route's own segments, slashes and all.
	n := strings.Count(rest, "/") + 1
	h1, s1 := cutLast(rest)
	h2, s2 := cutLast(h1)
	h3, s3 := cutLast(h2)
	var r route
	switch {
	case n >= 4 && s3 == "blobs" && s2 == "uploads":
		r.kind, r.name = routeUploads, h3
		if s1 != "" {
			if !idRe.MatchString(s1) {
				return route{}, errUploadUnknown
			}
			r.kind, r.upload = routeUpload, s1
		}
	case n >= 3 && s2 == "blobs" && s1 == "uploads":
		r.kind, r.name = routeUploads, h2
	case n >= 3 && s2 == "blobs":
		r.kind, r.name = routeBlob, h2
		d, err := parseDigest(s1)
		if err != nil {
			return route{}, err
		}
		r.digest = d
	case n >= 3 && s2 == "manifests":
		r.kind, r.name, r.ref = routeManifest, h2, s1
		if strings.Contains(r.ref, ":") {
			d, err := parseDigest(r.ref)
			if err != nil {
				return route{}, err
			}
			r.digest = d
		} else if !validTag(r.ref) {
			return route{}, errTagInvalid
		}
	case n >= 3 && s2 == "tags" && s1 == "list":
		r.kind, r.name = routeTags, h2
	case n >= 3 && s2 == "referrers":
		r.kind, r.name = routeReferrers, h2
		d, err := parseDigest(s1)
		if err != nil {
			return route{}, err
		}
		r.digest = d
	default:
		return route{}, errRouteUnknown
	}
	if err := validateName(r.name); err != nil {
		return route{}, err
	}
	return r, nil
}

// cutLast cuts s at its last slash; without one, head is "".
func cutLast(s string) (head, last string) {
	i := strings.LastIndexByte(s, '/')
	if i < 0 {
		return "", s
	}
	return s[:i], s[i+1:]
}

func validateName(name string) error {
	if len(name) > maxNameLen || !validName(name) {
		return errNameInvalid
	}
	return nil
}

// validName reports whether name is one by the distribution spec's
// grammar, [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*,
// read by hand: every request checks a name at least once, and the
// regexp was a tenth of a warm manifest GET (fuzz_test.go holds it and
// checks the two agree).
func validName(name string) bool {
	for {
		comp, rest, more := strings.Cut(name, "/")
		if !validComponent(comp) {
			return false
		}
		if !more {
			return true
		}
		name = rest
	}
}

// validComponent: runs of [a-z0-9], each two apart by ".", "_", "__" or
// any number of "-".
func validComponent(c string) bool {
	i := 0
	for {
		run := i
		for i < len(c) && ('a' <= c[i] && c[i] <= 'z' || '0' <= c[i] && c[i] <= '9') {
			i++
		}
		switch {
		case i == run:
			return false
		case i == len(c):
			return true
		case c[i] == '.':
			i++
		case c[i] == '_':
			i++
			if i < len(c) && c[i] == '_' {
				i++
			}
		case c[i] == '-':
			for i < len(c) && c[i] == '-' {
				i++
			}
		default:
			return false
		}
	}
}

// validTag reports whether tag is one by the spec's grammar,
// [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}.
func validTag(tag string) bool {
	if len(tag) == 0 || len(tag) > 128 || tag[0] == '.' || tag[0] == '-' {
		return false
	}
	for i := 0; i < len(tag); i++ {
		c := tag[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '.' || c == '-') {
			return false
		}
	}
	return true
}

// parseDigest accepts a well-formed digest of an algorithm slipway can
// verify (sha256, sha512).
func parseDigest(s string) (digest.Digest, error) {
	d, err := digest.Parse(s)
	if err != nil {
		return "", errDigestInvalid
	}
	switch d.Algorithm() {
	case digest.SHA256, digest.SHA512:
	default:
		return "", errDigestUnsupported
	}
	return d, nil
}
