package cache

import (
	"bytes"
	"encoding/binary"
	"errors"
	"time"

	"github.com/opencontainers/go-digest"
)

// The badger index. Every key starts with a one-byte prefix; parts that may
// contain ':' or '/' (hosts, repository names) are separated by a zero byte,
// which neither may contain. Integers are big-endian. Only the keyXxx
// functions below build keys.
//
//	'b' digest                       -> blobValue     (size, origin, stored at)
//	'm' digest                       -> manifestValue (media type, raw bytes)
//	't' ns 0x00 repo 0x00 tag        -> tagValue      (digest, FetchedAt)
//	'l' ns 0x00 repo 0x00 digest     -> empty         (repo references digest)
//	'u' upload id                    -> upload state, with a badger TTL (push)
//	'n' repo                         -> created at, unix nanos (a local repository exists)
//	'r' ns 0x00 repo 0x00 subject 0x00 digest -> descriptor JSON (digest refers to subject)
//	'a' digest                       -> last access, unix nanoseconds (batched)
//
// ns is the upstream a repository is proxied from (its host, e.g.
// "registry-1.docker.io"), or "" for a local repository that was pushed to.
//
// Blob bytes are not in badger. They live in files (see blobPath):
//
//	<data-dir>/blobs/<algorithm>/<first two hex chars>/<hex>   verified, immutable
//	<data-dir>/tmp/<random>                                    being written
//	<data-dir>/index/                                          badger
const (
	prefixBlob     = 'b'
	prefixManifest = 'm'
	prefixTag      = 't'
	prefixLink     = 'l'
	prefixUpload   = 'u'
	prefixRepo     = 'n'
	prefixReferrer = 'r'
	prefixAccess   = 'a'
)

func keyBlob(d digest.Digest) []byte     { return join(prefixBlob, string(d)) }
func keyManifest(d digest.Digest) []byte { return join(prefixManifest, string(d)) }
func keyTag(ns, repo, tag string) []byte { return join(prefixTag, ns, repo, tag) }
func keyTagPrefix(ns, repo string) []byte {
	return append(join(prefixTag, ns, repo), 0)
}
func keyLink(ns, repo string, d digest.Digest) []byte {
	return join(prefixLink, ns, repo, string(d))
}
func keyUpload(id string) []byte { return join(prefixUpload, id) }
func keyUploadPrefix() []byte    { return []byte{prefixUpload} }
func keyRepo(name string) []byte { return join(prefixRepo, name) }
func keyRepoPrefix() []byte      { return []byte{prefixRepo} }
func keyReferrer(ns, repo string, subject, d digest.Digest) []byte {
	return join(prefixReferrer, ns, repo, string(subject), string(d))
}
func keyReferrerPrefix(ns, repo string, subject digest.Digest) []byte {
	return append(join(prefixReferrer, ns, repo, string(subject)), 0)
}
func keyLinkPrefix(ns, repo string) []byte { return append(join(prefixLink, ns, repo), 0) }
func keyAccess(d digest.Digest) []byte     { return join(prefixAccess, string(d)) }

func join(prefix byte, parts ...string) []byte {
	n := 1
	for _, p := range parts {
		n += len(p) + 1
	}
	k := make([]byte, 0, n)
	k = append(k, prefix)
	for i, p := range parts {
		if i > 0 {
			k = append(k, 0)
		}
		k = append(k, p...)
	}
	return k
}

// Origin says where a blob or manifest came from. Pushed content is pinned:
// the cache budget never evicts it.
type Origin byte

const (
	OriginPulled Origin = 'p' // filled from an upstream
	OriginPushed Origin = 'P' // uploaded by a client
)

func (o Origin) String() string {
	if o == OriginPushed {
		return "pushed"
	}
	return "pulled"
}

var errCorruptValue = errors.New("cache: corrupt index value")

// blobValue: size (8) | origin (1) | stored at, unix nanos (8).
func encodeBlob(b BlobInfo) []byte {
	v := make([]byte, 17)
	binary.BigEndian.PutUint64(v[0:8], uint64(b.Size))
	v[8] = byte(b.Origin)
	binary.BigEndian.PutUint64(v[9:17], uint64(b.StoredAt.UnixNano()))
	return v
}

func decodeBlob(d digest.Digest, v []byte) (BlobInfo, error) {
	if len(v) != 17 {
		return BlobInfo{}, errCorruptValue
	}
	return BlobInfo{
		Digest:   d,
		Size:     int64(binary.BigEndian.Uint64(v[0:8])),
		Origin:   Origin(v[8]),
		StoredAt: time.Unix(0, int64(binary.BigEndian.Uint64(v[9:17]))),
	}, nil
}

// manifestValue: origin (1) | media type length (2) | media type | raw bytes.
func encodeManifest(m Manifest) []byte {
	v := make([]byte, 0, 3+len(m.MediaType)+len(m.Bytes))
	v = append(v, byte(m.Origin))
	v = binary.BigEndian.AppendUint16(v, uint16(len(m.MediaType)))
	v = append(v, m.MediaType...)
	return append(v, m.Bytes...)
}

func decodeManifest(d digest.Digest, v []byte) (Manifest, error) {
	if len(v) < 3 {
		return Manifest{}, errCorruptValue
	}
	n := int(binary.BigEndian.Uint16(v[1:3]))
	if len(v) < 3+n {
		return Manifest{}, errCorruptValue
	}
	return Manifest{
		Digest:    d,
		Origin:    Origin(v[0]),
		MediaType: string(v[3 : 3+n]),
		Bytes:     bytes.Clone(v[3+n:]),
	}, nil
}

// tagValue: FetchedAt, unix nanos (8) | digest.
func encodeTag(t Tag) []byte {
	v := make([]byte, 8, 8+len(t.Digest))
	binary.BigEndian.PutUint64(v, uint64(t.FetchedAt.UnixNano()))
	return append(v, t.Digest...)
}

func decodeTag(v []byte) (Tag, error) {
	if len(v) < 9 {
		return Tag{}, errCorruptValue
	}
	return Tag{
		FetchedAt: time.Unix(0, int64(binary.BigEndian.Uint64(v[:8]))),
		Digest:    digest.Digest(v[8:]),
	}, nil
}
