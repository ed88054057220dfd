package cache

import (
	"encoding/json"
	"fmt"

	"github.com/opencontainers/go-digest"
)

// ManifestReferences returns the digests a manifest or index points at:
// config, layers, blobs, child manifests and subject.
func ManifestReferences(b []byte) ([]digest.Digest, error) {
	type desc struct {
		Digest digest.Digest `json:"digest"`
	}
	var m struct {
		Config    *desc  `json:"config"`
		Layers    []desc `json:"layers"`
		Blobs     []desc `json:"blobs"`
		Manifests []desc `json:"manifests"`
		Subject   *desc  `json:"subject"`
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("cache: manifest is not valid JSON: %w", err)
	}
	var out []digest.Digest
	add := func(d desc) {
		if d.Digest != "" {
			out = append(out, d.Digest)
		}
	}
	if m.Config != nil {
		add(*m.Config)
	}
	for _, l := range [][]desc{m.Layers, m.Blobs, m.Manifests} {
		for _, d := range l {
			add(d)
		}
	}
	if m.Subject != nil {
		add(*m.Subject)
	}
	return out, nil
}
