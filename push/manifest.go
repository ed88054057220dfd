package push

import (
	"encoding/json"
	"errors"
	"fmt"

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

// PutManifest validates and stores a manifest pushed to repo under ref (a tag
// or a digest), and points tags (from ?tag=) at it. contentType is the
// request's Content-Type; the manifest's own mediaType field is the fallback.
// Every blob and manifest it holds must be in repo (pushed or mounted
// there, and still stored), except its subject, which need not exist yet,
// and its non-distributable layers. The store checks that, and writes the
// manifest, its links, tags and referrer entry, under the locks of all of
// them: GC cannot take a blob between the check and the 201.
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
	p := Pushed{Digest: d, MediaType: mt, Tags: tags}
	if man.Subject != nil {
		p.Subject = man.Subject.Digest
	}
	put := cache.ManifestPut{Repo: repo, Tags: tags, Local: true,
		Manifest: cache.Manifest{Digest: d, MediaType: mt, Bytes: body, Origin: cache.OriginPushed}}
	if err := m.store.PutManifest(put); err != nil {
		return Pushed{}, manifestErr(err)
	}
	return p, m.store.AddRepository(repo)
}

// manifestErr turns the store's verdict on a manifest's references into
// push sentinels.
func manifestErr(err error) error {
	switch {
	case errors.Is(err, cache.ErrRefUnknown):
		return fmt.Errorf("%w: %v", ErrManifestBlobUnknown, err)
	case errors.Is(err, cache.ErrRefSize), errors.Is(err, cache.ErrBadManifest), errors.Is(err, cache.ErrBadMediaType):
		return fmt.Errorf("%w: %v", ErrManifestInvalid, err)
	}
	return storeErr(err)
}

// parseManifest checks that body is a manifest of a type slipway serves and
// returns it with its media type.
func parseManifest(contentType string, body []byte) (manifest, string, error) {
	var man manifest
	if err := json.Unmarshal(body, &man); err != nil {
		return manifest{}, "", fmt.Errorf("%w: not valid JSON: %v", ErrManifestInvalid, err)
	}
	mt, err := cache.MediaType(contentType)
	if err != nil {
		return manifest{}, "", fmt.Errorf("%w: Content-Type: %v", ErrManifestInvalid, err)
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
