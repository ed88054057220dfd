package mirror

import (
	"errors"
	"fmt"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/opencontainers/go-digest"
)

// ImageRef is an image as a client of this mirror names it ("alpine:3.20",
// "ghcr.io/org/app:v1", "team/app@sha256:...", "localhost:5000/x:y"), read
// by ParseImage. slipway prefetch and POST /v2/_slipway/prefetch both use
// it, so a name means the same to both.
type ImageRef struct {
	// Name is the repository as a /v2/ path on this mirror names it:
	// "alpine", "team/app", "ghcr.io/org/app" (an upstream's name or
	// host as a prefix, routed as any pull is).
	Name string
	// NS is set when the image names its registry by host:port
	// ("localhost:5000/x"): a /v2/ path cannot carry a colon, so the
	// upstream of that host is named in ?ns=, as containerd names it, and
	// Name is the repository there ("x").
	NS string
	// Ref is the tag ("latest" when none is given) or the digest; with
	// both ("alpine:3.20@sha256:..."), the digest, as docker pull does.
	Ref string
}

// ParseImage reads an image reference with go-containerregistry's name
// package, then holds its parts to what slipway serves: the distribution
// spec's repository grammar and tag pattern, sha256 or sha512 digests. Its
// errors are OCI errors (NAME_INVALID, TAG_INVALID, DIGEST_INVALID, all
// 400) that say which part is wrong.
func ParseImage(s string) (ImageRef, error) {
	bad := func(c code, what, why string) error {
		return &ociError{code: c, message: fmt.Sprintf("image %q: %s: %s", s, what, why)}
	}
	// No default registry: "alpine" stays "alpine", not Docker Hub's
	// "index.docker.io/library/alpine"; the mirror's routing decides.
	opt := name.WithDefaultRegistry("")
	ref, err := name.ParseReference(s, opt)
	if err != nil {
		// ParseReference says only "could not parse"; the parser of the
		// form it tried last says what is wrong.
		_, d, isDigest := strings.Cut(s, "@")
		var why error
		if isDigest {
			_, why = name.NewDigest(s, opt)
		} else {
			_, why = name.NewTag(s, opt)
		}
		if why != nil { // nil for what only ParseReference refuses (a URL)
			err = why
		}
		if isDigest && digest.Digest(d).Validate() != nil {
			return ImageRef{}, bad(codeDigestInvalid, "invalid digest", err.Error())
		}
		return ImageRef{}, bad(codeNameInvalid, "not an image reference", err.Error())
	}
	repo := ref.Context()
	var r ImageRef
	switch reg := repo.RegistryStr(); {
	case reg == "":
		r.Name = repo.RepositoryStr()
	case strings.Contains(reg, ":"):
		r.NS, r.Name = reg, repo.RepositoryStr()
	default:
		r.Name = reg + "/" + repo.RepositoryStr()
	}
	if err := validateName(r.Name); err != nil {
		return ImageRef{}, bad(codeNameInvalid, "invalid repository name", fmt.Sprintf("%q is not one of the distribution spec", r.Name))
	}
	switch ref := ref.(type) {
	case name.Digest:
		r.Ref = ref.DigestStr()
		if _, err := parseDigest(r.Ref); err != nil {
			e := errDigestInvalid
			errors.As(err, &e)
			return ImageRef{}, bad(e.code, e.message, r.Ref)
		}
	case name.Tag:
		r.Ref = ref.TagStr()
		if !validTag(r.Ref) {
			return ImageRef{}, bad(codeTagInvalid, "invalid tag", r.Ref)
		}
	}
	return r, nil
}
