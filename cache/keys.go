package cache

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
)

// The badger index. Every key starts with a one-byte prefix; parts that may
// contain ':' or '/' (hosts, repository names) are separated by a zero byte,
// which none of them may contain. Integers are big-endian. Only the keyXxx
// functions below build keys, and each value's decoder sits beside its
// encoder.
//
//	'b' digest                                -> blobValue     (size, origin, stored at)
//	'm' digest                                -> manifestValue (origin, media type, raw bytes)
//	't' ns 0x00 repo 0x00 tag                 -> tagValue      (FetchedAt, digest)
//	'l' ns 0x00 repo 0x00 digest              -> empty         (repo references digest)
//	'u' upload id                             -> uploadValue, with a badger TTL (push)
//	'n' repo                                  -> created at, unix nanos (a local repository exists)
//	'r' ns 0x00 repo 0x00 subject 0x00 digest -> descriptor JSON (digest refers to subject)
//	'a' digest                                -> last use, unix nanos (batched, see Touch)
//	'g' ns 0x00 repo                          -> tagListValue (FetchedAt, an upstream's tag list)
//	'f' ns 0x00 repo 0x00 subject             -> fetchedValue (FetchedAt, an upstream's referrers index)
//	'R' digest 0x00 'h' 0x00 manifest         -> empty: manifest holds digest (config, layer, child)
//	'R' digest 0x00 'l' 0x00 ns 0x00 repo     -> empty: the mirror of an 'l' key
//	'R' digest 0x00 't' 0x00 ns 0x00 repo 0x00 tag -> empty: the mirror of a 't' key
//	'v'                                       -> index format version (1 byte)
//	'q' 'b' 0x00 digest                       -> empty: blob waits to go to the shared tier
//	'q' 'm' 0x00 digest                       -> empty: manifest waits to go to the shared tier
//	'q' 't' 0x00 ns 0x00 repo 0x00 tag        -> empty: pulled tag waits to go to the shared tier
//
// ns is the upstream a repository is proxied from (its host, e.g.
// "registry-1.docker.io"), or "" for a local repository that was pushed to.
//
// The 'R' keys answer "what refers to this digest" with one prefix scan:
// GC and eviction ask it, under the digest's lock, at the moment they act
// (see live.go). They are written and deleted in the same transaction as
// the 'm', 'l' and 't' keys they mirror.
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
	prefixRef      = 'R'
	prefixVersion  = 'v'
	prefixTagList  = 'g'
	prefixRefIndex = 'f'
	prefixQueue    = 'q'
)

// What a 'q' key queues.
const (
	queueBlob     = 'b'
	queueManifest = 'm'
	queueTag      = 't'
)

// What an 'R' key says refers to its digest.
const (
	refHolder = 'h'
	refLink   = 'l'
	refTag    = 't'
)

// indexVersion 2 added the 'R' keys; an index without them is migrated
// when it is opened.
const indexVersion = 2

func keyBlob(d digest.Digest) []byte     { return join(prefixBlob, string(d)) }
func keyManifest(d digest.Digest) []byte { return join(prefixManifest, string(d)) }
func keyAccess(d digest.Digest) []byte   { return join(prefixAccess, string(d)) }
func keyTag(ns, repo, tag string) []byte { return join(prefixTag, ns, repo, tag) }
func keyTagPrefix(ns, repo string) []byte {
	return append(join(prefixTag, ns, repo), 0)
}
func keyLink(ns, repo string, d digest.Digest) []byte {
	return join(prefixLink, ns, repo, string(d))
}
func keyLinkPrefix(ns, repo string) []byte { return append(join(prefixLink, ns, repo), 0) }
func keyUpload(id string) []byte           { return join(prefixUpload, id) }
func keyRepo(name string) []byte           { return join(prefixRepo, name) }
func keyReferrer(ns, repo string, subject, d digest.Digest) []byte {
	return join(prefixReferrer, ns, repo, string(subject), string(d))
}
func keyReferrerPrefix(ns, repo string, subject digest.Digest) []byte {
	return append(join(prefixReferrer, ns, repo, string(subject)), 0)
}
func keyVersion() []byte { return []byte{prefixVersion} }
func keyTagList(ns, repo string) []byte {
	return join(prefixTagList, ns, repo)
}
func keyRefIndex(ns, repo string, subject digest.Digest) []byte {
	return join(prefixRefIndex, ns, repo, string(subject))
}

// keyBlobsOf is the prefix of the 'b' keys of one digest algorithm.
func keyBlobsOf(alg digest.Algorithm) []byte { return join(prefixBlob, string(alg)+":") }

func keyQueueBlob(d digest.Digest) []byte { return join(prefixQueue, string(queueBlob), string(d)) }
func keyQueueManifest(d digest.Digest) []byte {
	return join(prefixQueue, string(queueManifest), string(d))
}
func keyQueueTag(ns, repo, tag string) []byte {
	return join(prefixQueue, string(queueTag), ns, repo, tag)
}

// parseQueueKey splits a 'q' key into its kind and parts.
func parseQueueKey(k []byte) (kind byte, parts []string, ok bool) {
	p := splitKey(k)
	if len(p) < 2 || len(p[0]) != 1 {
		return 0, nil, false
	}
	kind, parts = p[0][0], p[1:]
	switch {
	case (kind == queueBlob || kind == queueManifest) && len(parts) == 1:
	case kind == queueTag && len(parts) == 3:
	default:
		return 0, nil, false
	}
	return kind, parts, true
}

// keyAll is the prefix of every key of one kind.
func keyAll(prefix byte) []byte { return []byte{prefix} }

// keyRefsOf is the prefix of every 'R' key of d.
func keyRefsOf(d digest.Digest) []byte { return append(join(prefixRef, string(d)), 0) }
func keyHolder(d, manifest digest.Digest) []byte {
	return join(prefixRef, string(d), string(refHolder), string(manifest))
}
func keyLinkRef(ns, repo string, d digest.Digest) []byte {
	return join(prefixRef, string(d), string(refLink), ns, repo)
}
func keyTagRef(ns, repo, tag string, d digest.Digest) []byte {
	return join(prefixRef, string(d), string(refTag), ns, repo, tag)
}

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

// splitKey splits a key's parts after its prefix byte.
func splitKey(k []byte) []string {
	return strings.Split(string(k[1:]), "\x00")
}

// digestKey is the digest of a 'b', 'm' or 'a' key.
func digestKey(k []byte) digest.Digest { return digest.Digest(k[1:]) }

// parseTagKey splits a 't' key.
func parseTagKey(k []byte) (ns, repo, tag string, ok bool) {
	p := splitKey(k)
	if len(p) != 3 {
		return "", "", "", false
	}
	return p[0], p[1], p[2], true
}

// parseLinkKey splits an 'l' key.
func parseLinkKey(k []byte) (ns, repo string, d digest.Digest, ok bool) {
	p := splitKey(k)
	if len(p) != 3 {
		return "", "", "", false
	}
	return p[0], p[1], digest.Digest(p[2]), true
}

// ref is one 'R' key: something that refers to a digest.
type ref struct {
	kind          byte          // refHolder, refLink or refTag
	holder        digest.Digest // refHolder: the manifest
	ns, repo, tag string        // refLink, refTag
}

// key is the 'R' key of r, which refers to d.
func (r ref) key(d digest.Digest) []byte {
	switch r.kind {
	case refHolder:
		return keyHolder(d, r.holder)
	case refLink:
		return keyLinkRef(r.ns, r.repo, d)
	}
	return keyTagRef(r.ns, r.repo, r.tag, d)
}

// parseRefKey splits an 'R' key.
func parseRefKey(k []byte) (d digest.Digest, r ref, ok bool) {
	p := splitKey(k)
	if len(p) < 3 || len(p[1]) != 1 {
		return "", ref{}, false
	}
	d, r.kind = digest.Digest(p[0]), p[1][0]
	switch {
	case r.kind == refHolder && len(p) == 3:
		r.holder = digest.Digest(p[2])
	case r.kind == refLink && len(p) == 4:
		r.ns, r.repo = p[2], p[3]
	case r.kind == refTag && len(p) == 5:
		r.ns, r.repo, r.tag = p[2], p[3], p[4]
	default:
		return "", ref{}, false
	}
	return d, r, true
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

var (
	errCorruptValue = errors.New("cache: corrupt index value")
	// errUnencodable is a value too big for its length field.
	errUnencodable = errors.New("cache: value cannot be encoded")
)

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
// A media type is at most MaxMediaTypeLength bytes (checked where it
// enters); the encoder refuses what its length field cannot hold.
func encodeManifest(m Manifest) ([]byte, error) {
	if len(m.MediaType) > 0xffff {
		return nil, fmt.Errorf("%w: a media type of %d bytes", errUnencodable, len(m.MediaType))
	}
	v := make([]byte, 0, 3+len(m.MediaType)+len(m.Bytes))
	v = append(v, byte(m.Origin))
	v = binary.BigEndian.AppendUint16(v, uint16(len(m.MediaType)))
	v = append(v, m.MediaType...)
	return append(v, m.Bytes...), nil
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

// manifestOrigin reads only the origin of a manifestValue.
func manifestOrigin(v []byte) (Origin, error) {
	if len(v) < 3 {
		return 0, errCorruptValue
	}
	return Origin(v[0]), nil
}

// manifestSize is the byte count of the manifest a manifestValue holds,
// read from its header: what the running totals count for it, when it is
// stored, removed, planned for eviction or counted at startup (badger's
// ValueSize would count the media type, and only estimates the size of a
// value in its value log). An unreadable value counts 0.
func manifestSize(v []byte) int64 {
	if len(v) < 3 {
		return 0
	}
	return max(int64(len(v)-3-int(binary.BigEndian.Uint16(v[1:3]))), 0)
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

// tagListValue: FetchedAt, unix nanos (8) | tags, each ended by '\n'
// (a tag cannot hold one).
func encodeTagList(tags []string, at time.Time) []byte {
	n := 8
	for _, t := range tags {
		n += len(t) + 1
	}
	v := binary.BigEndian.AppendUint64(make([]byte, 0, n), uint64(at.UnixNano()))
	for _, t := range tags {
		v = append(append(v, t...), '\n')
	}
	return v
}

func decodeTagList(v []byte) ([]string, time.Time, error) {
	if len(v) < 8 {
		return nil, time.Time{}, errCorruptValue
	}
	at := time.Unix(0, int64(binary.BigEndian.Uint64(v[:8])))
	tags := []string{}
	for rest := v[8:]; len(rest) > 0; {
		i := bytes.IndexByte(rest, '\n')
		if i < 0 {
			return nil, time.Time{}, errCorruptValue
		}
		tags, rest = append(tags, string(rest[:i])), rest[i+1:]
	}
	return tags, at, nil
}

// fetchedValue: FetchedAt, unix nanos (8) | the bytes as fetched.
func encodeFetched(b []byte, at time.Time) []byte {
	return append(binary.BigEndian.AppendUint64(make([]byte, 0, 8+len(b)), uint64(at.UnixNano())), b...)
}

func decodeFetched(v []byte) ([]byte, time.Time, error) {
	if len(v) < 8 {
		return nil, time.Time{}, errCorruptValue
	}
	return bytes.Clone(v[8:]), time.Unix(0, int64(binary.BigEndian.Uint64(v[:8]))), nil
}

// accessValue and repoValue: unix nanos (8).
func encodeTime(t int64) []byte { return binary.BigEndian.AppendUint64(nil, uint64(t)) }

func decodeTime(v []byte) (int64, bool) {
	if len(v) != 8 {
		return 0, false
	}
	return int64(binary.BigEndian.Uint64(v)), true
}

// uploadValue: size (8) | started, unix nanos (8) | repo length (2) | repo |
// temp length (1) | temp | sha256 state.
func encodeUpload(u uploadState) ([]byte, error) {
	if len(u.Repo) > 0xffff || len(u.temp) > 0xff {
		return nil, fmt.Errorf("%w: an upload of a %d-byte repository name", errUnencodable, len(u.Repo))
	}
	if len(u.boot) != 0 && len(u.boot) != bootIDLen {
		return nil, fmt.Errorf("%w: a %d-byte boot id", errUnencodable, len(u.boot))
	}
	v := make([]byte, 0, 19+len(u.Repo)+len(u.temp)+len(u.hash)+len(u.boot))
	v = binary.BigEndian.AppendUint64(v, uint64(u.Size))
	v = binary.BigEndian.AppendUint64(v, uint64(u.StartedAt.UnixNano()))
	v = binary.BigEndian.AppendUint16(v, uint16(len(u.Repo)))
	v = append(v, u.Repo...)
	v = append(v, byte(len(u.temp)))
	v = append(v, u.temp...)
	v = append(v, u.hash...)
	// The boot id comes last, after a hash state of fixed length, so an
	// upload stored by an older slipway (no boot id) still decodes.
	return append(v, u.boot...), nil
}

func decodeUpload(id string, v []byte) (uploadState, error) {
	if len(v) < 19 {
		return uploadState{}, errCorruptValue
	}
	u := uploadState{Upload: Upload{
		ID:        id,
		Size:      int64(binary.BigEndian.Uint64(v[0:8])),
		StartedAt: time.Unix(0, int64(binary.BigEndian.Uint64(v[8:16]))),
	}}
	n := int(binary.BigEndian.Uint16(v[16:18]))
	v = v[18:]
	if len(v) < n+1 {
		return uploadState{}, errCorruptValue
	}
	u.Repo, v = string(v[:n]), v[n:]
	n, v = int(v[0]), v[1:]
	if len(v) < n {
		return uploadState{}, errCorruptValue
	}
	u.temp, v = string(v[:n]), v[n:]
	if len(v) == sha256StateLen+bootIDLen {
		v, u.boot = v[:sha256StateLen], string(v[sha256StateLen:])
	}
	u.hash = append([]byte(nil), v...)
	return u, nil
}
