package cache

import (
	"encoding/json"
	"fmt"
	"mime"
	"strings"

	"github.com/opencontainers/go-digest"
)

// Ref is one thing a manifest holds: a blob (config, layer) or, in an
// index, a child manifest.
type Ref struct {
	Digest   digest.Digest
	Size     int64
	Manifest bool // a child manifest of an index
}

// References parses a manifest or index into what it holds and its
// subject ("" if none). Held are its config, layers and blobs, or its
// child manifests, each once. Not held: non-distributable (foreign)
// layers, which live at their urls and which a registry need not have,
// and the subject, which this manifest refers to and which lives on (or
// not) without it. Only what a manifest holds is linked into its
// repository and kept alive by it.
func References(b []byte) (held []Ref, subject digest.Digest, err error) {
	type desc struct {
		MediaType string        `json:"mediaType"`
		Digest    digest.Digest `json:"digest"`
		Size      int64         `json:"size"`
	}
	var m struct {
		Config    *desc  `json:"config"`
		Layers    []desc `json:"layers"`
		Blobs     []desc `json:"blobs"`
		Manifests []desc `json:"manifests"`
		Subject   *desc  `json:"subject"`
		FSLayers  []struct {
			BlobSum digest.Digest `json:"blobSum"`
		} `json:"fsLayers"` // Docker schema 1
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, "", fmt.Errorf("%w: not valid JSON: %v", ErrBadManifest, err)
	}
	seen := map[digest.Digest]bool{}
	add := func(d desc, child bool) error {
		if d.Digest == "" {
			return nil
		}
		if err := d.Digest.Validate(); err != nil {
			return fmt.Errorf("%w: digest %q: %v", ErrBadManifest, d.Digest, err)
		}
		if seen[d.Digest] {
			return nil
		}
		seen[d.Digest] = true
		held = append(held, Ref{Digest: d.Digest, Size: d.Size, Manifest: child})
		return nil
	}
	if m.Config != nil {
		if err := add(*m.Config, false); err != nil {
			return nil, "", err
		}
	}
	for _, l := range [][]desc{m.Layers, m.Blobs} {
		for _, d := range l {
			if NonDistributable(d.MediaType) {
				continue
			}
			if err := add(d, false); err != nil {
				return nil, "", err
			}
		}
	}
	for _, d := range m.Manifests {
		if err := add(d, true); err != nil {
			return nil, "", err
		}
	}
	for _, l := range m.FSLayers {
		if err := add(desc{Digest: l.BlobSum, Size: -1}, false); err != nil {
			return nil, "", err
		}
	}
	if m.Subject != nil && m.Subject.Digest != "" {
		if err := m.Subject.Digest.Validate(); err != nil {
			return nil, "", fmt.Errorf("%w: subject digest %q: %v", ErrBadManifest, m.Subject.Digest, err)
		}
		subject = m.Subject.Digest
	}
	return held, subject, nil
}

// NonDistributable reports whether a layer media type is one a registry
// need not hold: a foreign or non-distributable layer, fetched from its
// urls.
func NonDistributable(mt string) bool {
	return strings.Contains(mt, ".nondistributable.") || strings.Contains(mt, ".foreign.")
}

// MaxMediaTypeLength bounds a media type: RFC 6838 allows 127 characters
// for each of type and subtype.
const MaxMediaTypeLength = 255

// MediaType validates a media type as it enters the store (an upstream's
// Content-Type, a push's) and returns it without parameters, lower case.
// Empty stays empty (the caller decides what that means).
func MediaType(s string) (string, error) {
	if s == "" {
		return "", nil
	}
	if len(s) > 4*MaxMediaTypeLength {
		return "", fmt.Errorf("%w: a media type of %d bytes", ErrBadMediaType, len(s))
	}
	mt, _, err := mime.ParseMediaType(s)
	if err != nil {
		return "", fmt.Errorf("%w: %q: %v", ErrBadMediaType, s, err)
	}
	if len(mt) > MaxMediaTypeLength || !strings.Contains(mt, "/") {
		return "", fmt.Errorf("%w: %q", ErrBadMediaType, mt)
	}
	return mt, nil
}
