package cache

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
)

// Referrer is m's entry in its subject's referrers list, as the referrers
// API lists it: its media type, size and digest, its artifactType (for an
// image without one, its config's media type) and its annotations. ok is
// false for a manifest without a subject.
func Referrer(m Manifest) (subject digest.Digest, desc v1.Descriptor, ok bool) {
	var man struct {
		ArtifactType string            `json:"artifactType"`
		Annotations  map[string]string `json:"annotations"`
		Config       *struct {
			MediaType string `json:"mediaType"`
		} `json:"config"`
	}
	_, subject, err := References(m.Bytes)
	if err != nil || subject == "" || json.Unmarshal(m.Bytes, &man) != nil {
		return "", v1.Descriptor{}, false
	}
	at := man.ArtifactType
	if at == "" && man.Config != nil {
		at = man.Config.MediaType
	}
	return subject, v1.Descriptor{
		MediaType:    types.MediaType(m.MediaType),
		Size:         int64(len(m.Bytes)),
		Digest:       v1.Hash{Algorithm: string(m.Digest.Algorithm()), Hex: m.Digest.Encoded()},
		ArtifactType: at,
		Annotations:  man.Annotations,
	}, true
}

// ReferrerDescriptors returns the referrers recorded for subject in
// ns/repo (the manifests with that subject it pushed or pulled), in digest
// order.
func (s *Store) ReferrerDescriptors(ns, repo string, subject digest.Digest) ([]v1.Descriptor, error) {
	raw, err := s.Referrers(ns, repo, subject)
	if s.shared != nil && ns == "" {
		ctx, cancel := tierCtx()
		defer cancel()
		if shared, serr := s.shared.Referrers(ctx, repo, subject); !down(serr) {
			raw, err = shared, sharedErr(serr)
		}
	}
	if err != nil {
		return nil, err
	}
	out := make([]v1.Descriptor, 0, len(raw))
	for _, b := range raw {
		var d v1.Descriptor
		if err := json.Unmarshal(b, &d); err != nil {
			return nil, fmt.Errorf("cache: stored referrer of %s: %w", subject, err)
		}
		out = append(out, d)
	}
	return out, nil
}

// ReferrersIndex is the referrers API's answer: an OCI image index of the
// descriptors, each digest once, in digest order, and only those of
// artifactType if it is not empty. It is never nil: nothing refers to the
// subject is an empty list.
func ReferrersIndex(descs []v1.Descriptor, artifactType string) v1.IndexManifest {
	idx := v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex, Manifests: []v1.Descriptor{}}
	for _, d := range descs {
		if artifactType != "" && d.ArtifactType != artifactType {
			continue
		}
		if slices.ContainsFunc(idx.Manifests, func(o v1.Descriptor) bool { return o.Digest == d.Digest }) {
			continue
		}
		idx.Manifests = append(idx.Manifests, d)
	}
	slices.SortFunc(idx.Manifests, func(a, b v1.Descriptor) int { return strings.Compare(a.Digest.String(), b.Digest.String()) })
	return idx
}
