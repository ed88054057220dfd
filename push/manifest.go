package push

import (
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"

	"slipway/cache"
)

// Manifest media types a push may use.
const (
	mediaTypeOCIManifest    = "application/vnd.oci.image.manifest.v1+json"
	mediaTypeOCIIndex       = "application/vnd.oci.image.index.v1+json"
	mediaTypeDockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
	mediaTypeDockerList     = "application/vnd.docker.distribution.manifest.list.v2+json"
)

func isIndexType(mt string) bool { return mt == mediaTypeOCIIndex || mt == mediaTypeDockerList }

// Pushed is what a manifest PUT stored.
type Pushed struct {
	Digest    digest.Digest
	MediaType string
	Subject   digest.Digest // the manifest it refers to, "" if none
	Tags      []string      // tags now pointing at it
}

// manifest is the part of an image manifest or index that a push checks.
// go-digest types (not go-containerregistry's v1.Hash) so that every
// digest is validated, algorithm and length.
type manifest struct {
	SchemaVersion *int              `json:"schemaVersion"`
	MediaType     string            `json:"mediaType"`
	ArtifactType  string            `json:"artifactType"`
	Config        *descriptor       `json:"config"`
	Layers        []descriptor      `json:"layers"`
	Manifests     []descriptor      `json:"manifests"`
	Subject       *descriptor       `json:"subject"`
	Annotations   map[string]string `json:"annotations"`
}

type descriptor struct {
	MediaType string        `json:"mediaType"`
	Digest    digest.Digest `json:"digest"`
	Size      int64         `json:"size"`
}

func (d descriptor) validate(what string) error {
	if err := d.Digest.Validate(); err != nil {
		return fmt.Errorf("%w: %s digest %q: %v", ErrManifestInvalid, what, d.Digest, err)
	}
	if d.Size < 0 {
		return fmt.Errorf("%w: %s %s has a negative size", ErrManifestInvalid, what, d.Digest)
	}
	return nil
}

// nonDistributable layers may live elsewhere (urls); a manifest may name
// them without the registry having them.
func nonDistributable(mt string) bool {
	return strings.Contains(mt, ".nondistributable.") || strings.Contains(mt, ".foreign.")
}

// PutManifest validates and stores a manifest pushed to repo under ref (a tag
// or a digest), and points tags (from ?tag=) at it. contentType is the
// request's Content-Type; the manifest's own mediaType field is the fallback.
// Every blob and manifest it references must be in repo (pushed or mounted
// there), except its subject, which need not exist yet.
func (m *Manager) PutManifest(repo, ref string, tags []string, contentType string, body []byte) (Pushed, error) {
	if err := m.permit(repo); err != nil {
		return Pushed{}, err
	}
	if len(body) > MaxManifestSize {
		return Pushed{}, fmt.Errorf("%w: %d bytes, the limit is %d", ErrManifestTooLarge, len(body), MaxManifestSize)
	}
	var d digest.Digest
	if want, err := digest.Parse(ref); err == nil {
		if !want.Algorithm().Available() {
			return Pushed{}, fmt.Errorf("%w: unsupported algorithm %s", ErrDigestInvalid, want.Algorithm())
		}
		if got := want.Algorithm().FromBytes(body); got != want {
			return Pushed{}, fmt.Errorf("%w: manifest digest is %s, pushed as %s", ErrDigestInvalid, got, want)
		}
		d = want
	} else {
		d = digest.SHA256.FromBytes(body)
		tags = append([]string{ref}, tags...)
	}
	man, mt, err := parseManifest(contentType, body)
	if err != nil {
		return Pushed{}, err
	}
	if err := m.checkReferences(repo, man, mt); err != nil {
		return Pushed{}, err
	}
	if err := m.store.PutManifest(cache.Manifest{Digest: d, MediaType: mt, Bytes: body, Origin: cache.OriginPushed}); err != nil {
		return Pushed{}, storeErr(err)
	}
	if err := m.store.Link("", repo, d); err != nil {
		return Pushed{}, err
	}
	p := Pushed{Digest: d, MediaType: mt, Tags: tags}
	if man.Subject != nil {
		p.Subject = man.Subject.Digest
		desc, err := json.Marshal(referrerOf(man, mt, d, int64(len(body))))
		if err != nil {
			return Pushed{}, err
		}
		if err := m.store.PutReferrer("", repo, p.Subject, d, desc); err != nil {
			return Pushed{}, err
		}
	}
	for _, tag := range tags {
		if err := m.store.SetTag("", repo, tag, cache.Tag{Digest: d, FetchedAt: time.Now()}); err != nil {
			return Pushed{}, err
		}
	}
	return p, m.store.AddRepository(repo)
}

// parseManifest checks that body is a manifest of a type slipway serves and
// returns it with its media type.
func parseManifest(contentType string, body []byte) (manifest, string, error) {
	var man manifest
	if err := json.Unmarshal(body, &man); err != nil {
		return manifest{}, "", fmt.Errorf("%w: not valid JSON: %v", ErrManifestInvalid, err)
	}
	mt := ""
	if contentType != "" {
		t, _, err := mime.ParseMediaType(contentType)
		if err != nil {
			return manifest{}, "", fmt.Errorf("%w: Content-Type %q: %v", ErrManifestInvalid, contentType, err)
		}
		mt = t
	}
	switch {
	case mt == "":
		mt = man.MediaType
	case man.MediaType != "" && man.MediaType != mt:
		return manifest{}, "", fmt.Errorf("%w: Content-Type %s but mediaType %s", ErrManifestInvalid, mt, man.MediaType)
	}
	if mt == "" {
		// Neither says: an index lists manifests, an image has a config.
		mt = mediaTypeOCIManifest
		if man.Manifests != nil {
			mt = mediaTypeOCIIndex
		}
	}
	if man.SchemaVersion == nil || *man.SchemaVersion != 2 {
		return manifest{}, "", fmt.Errorf("%w: schemaVersion must be 2", ErrManifestInvalid)
	}
	switch mt {
	case mediaTypeOCIManifest, mediaTypeDockerManifest:
		if man.Config == nil {
			return manifest{}, "", fmt.Errorf("%w: image manifest without config", ErrManifestInvalid)
		}
		if man.Manifests != nil {
			return manifest{}, "", fmt.Errorf("%w: image manifest with a manifests list", ErrManifestInvalid)
		}
		if err := man.Config.validate("config"); err != nil {
			return manifest{}, "", err
		}
		for _, l := range man.Layers {
			if err := l.validate("layer"); err != nil {
				return manifest{}, "", err
			}
		}
	case mediaTypeOCIIndex, mediaTypeDockerList:
		if man.Config != nil || man.Layers != nil {
			return manifest{}, "", fmt.Errorf("%w: index with a config or layers", ErrManifestInvalid)
		}
		for _, c := range man.Manifests {
			if err := c.validate("manifest"); err != nil {
				return manifest{}, "", err
			}
		}
	default:
		return manifest{}, "", fmt.Errorf("%w: unsupported manifest media type %q", ErrManifestInvalid, mt)
	}
	if man.Subject != nil {
		if err := man.Subject.validate("subject"); err != nil {
			return manifest{}, "", err
		}
	}
	return man, mt, nil
}

// checkReferences makes sure repo has everything man points at: its config
// and layers (blobs), or its child manifests.
func (m *Manager) checkReferences(repo string, man manifest, mt string) error {
	if isIndexType(mt) {
		for _, c := range man.Manifests {
			if err := m.haveManifest(repo, c); err != nil {
				return err
			}
		}
		return nil
	}
	if err := m.haveBlob(repo, *man.Config); err != nil {
		return err
	}
	for _, l := range man.Layers {
		if nonDistributable(l.MediaType) {
			continue
		}
		if err := m.haveBlob(repo, l); err != nil {
			return err
		}
	}
	return nil
}

func (m *Manager) haveBlob(repo string, desc descriptor) error {
	linked, err := m.store.Linked("", repo, desc.Digest)
	if err != nil {
		return err
	}
	info, err := m.store.StatBlob(desc.Digest)
	if !linked || errors.Is(err, cache.ErrNotFound) {
		return fmt.Errorf("%w: blob %s", ErrManifestBlobUnknown, desc.Digest)
	}
	if err != nil {
		return err
	}
	if info.Size != desc.Size {
		return fmt.Errorf("%w: blob %s has %d bytes, the manifest says %d", ErrManifestInvalid, desc.Digest, info.Size, desc.Size)
	}
	return nil
}

func (m *Manager) haveManifest(repo string, desc descriptor) error {
	linked, err := m.store.Linked("", repo, desc.Digest)
	if err != nil {
		return err
	}
	got, err := m.store.GetManifest(desc.Digest)
	if !linked || errors.Is(err, cache.ErrNotFound) {
		return fmt.Errorf("%w: manifest %s", ErrManifestBlobUnknown, desc.Digest)
	}
	if err != nil {
		return err
	}
	if int64(len(got.Bytes)) != desc.Size {
		return fmt.Errorf("%w: manifest %s has %d bytes, the index says %d", ErrManifestInvalid, desc.Digest, len(got.Bytes), desc.Size)
	}
	return nil
}

// referrerOf is the descriptor the referrers API lists for a manifest: its
// artifactType, or for an image without one, its config's media type.
func referrerOf(man manifest, mt string, d digest.Digest, size int64) v1.Descriptor {
	at := man.ArtifactType
	if at == "" && man.Config != nil {
		at = man.Config.MediaType
	}
	return v1.Descriptor{
		MediaType:    types.MediaType(mt),
		Size:         size,
		Digest:       v1.Hash{Algorithm: string(d.Algorithm()), Hex: d.Encoded()},
		ArtifactType: at,
		Annotations:  man.Annotations,
	}
}
