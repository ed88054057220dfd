package cache

import (
	"encoding/base64"
	"errors"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// The status page's list of what is cached and pushed: every tag of every
// repository, local ones (ns "") first, then each upstream's, in key order,
// a page at a time. A page is one seek and a walk over the 't' keys; the
// walk reads keys only (a tag's value is read for the rows a page returns),
// and looks at MaxScan keys at most, so neither a big index nor a search
// that matches little can make one request slow. Pages are addressed by a
// cursor (the last key a page saw), never by an offset: page N costs what
// page 1 costs.

// TagRow is one tag of a repository, with what it points at.
type TagRow struct {
	NS, Repo, Tag string
	Digest        digest.Digest
	MediaType     string
	Origin        Origin
	// Size is the manifest and what it holds, as far as the store has it:
	// config and layers, for an index its child manifests and theirs;
	// each digest counted once. 0 if the manifest is not stored (evicted).
	Size int64
	// Stored is false when the manifest is not stored (evicted; the next
	// pull fetches it again).
	Stored bool
	// FetchedAt is when the upstream last confirmed a pulled tag, or when
	// a local one was pushed.
	FetchedAt time.Time
	// LastUse is the manifest's last use; zero if none is recorded.
	LastUse time.Time
}

// TagQuery asks for a page of tags.
type TagQuery struct {
	// After is a cursor from TagPage.Next; "" starts at the first tag.
	After string
	// Search keeps the tags whose "ns/repo:tag" ("repo:tag" for a local
	// repository) contains it, ignoring ASCII case; "" keeps all.
	Search string
	// Limit is the most rows a page has: default DefaultTagPage, at most
	// MaxTagPage.
	Limit int
	// MaxScan is the most tag keys a page looks at: default DefaultTagScan.
	MaxScan int
}

// TagPage is a page of tags.
type TagPage struct {
	Rows []TagRow
	// Next is the cursor of the next page; "" when nothing follows.
	Next string
	// Scanned is the number of tag keys the page looked at.
	Scanned int
	// Partial says the page stopped at MaxScan before it had Limit rows:
	// more may match after Next.
	Partial bool
}

// Bounds of a page of tags.
const (
	DefaultTagPage = 50
	MaxTagPage     = 500
	DefaultTagScan = 200_000
	maxCursor      = 4096
)

// ErrBadCursor is a TagQuery.After that no TagPage gave.
var ErrBadCursor = errors.New("cache: not a page cursor")

// TagPage returns a page of the tags of every repository (see TagQuery).
// In a fleet it lists what this replica's index holds.
func (s *Store) TagPage(q TagQuery) (TagPage, error) {
	if q.Limit <= 0 {
		q.Limit = DefaultTagPage
	}
	q.Limit = min(q.Limit, MaxTagPage)
	if q.MaxScan <= 0 {
		q.MaxScan = DefaultTagScan
	}
	prefix := keyAll(prefixTag)
	var start []byte
	if q.After != "" {
		k, err := decodeCursor(q.After)
		if err != nil {
			return TagPage{}, err
		}
		start = append(k, 0) // the first key after it
	}
	needle := lowerASCII([]byte(q.Search))
	var page TagPage
	var keys [][]byte
	var last []byte
	var buf []byte
	err := s.ix.view(func(txn *badger.Txn) error {
		err := each(txn, prefix, start, false, func(item *badger.Item) error {
			if page.Scanned == q.MaxScan {
				page.Partial = true
				return errStop
			}
			page.Scanned++
			k := item.Key()
			last = append(last[:0], k...)
			if len(needle) > 0 {
				buf = displayKey(buf[:0], k)
				if !containsFold(buf, needle) {
					return nil
				}
			}
			if len(keys) == q.Limit {
				// One more matches: there is a next page, after the last row.
				page.Next = encodeCursor(keys[len(keys)-1])
				return errStop
			}
			keys = append(keys, item.KeyCopy(nil))
			return nil
		})
		if err != nil {
			return err
		}
		if page.Partial {
			page.Next = encodeCursor(last)
		}
		page.Rows = make([]TagRow, 0, len(keys))
		for _, k := range keys {
			if r, ok := s.tagRow(txn, k); ok {
				page.Rows = append(page.Rows, r)
			}
		}
		return nil
	})
	return page, err
}

// tagRow reads what tag key k points at.
func (s *Store) tagRow(txn *badger.Txn, k []byte) (TagRow, bool) {
	ns, repo, tag, ok := parseTagKey(k)
	if !ok {
		return TagRow{}, false
	}
	v, err := getIn(txn, k)
	if err != nil {
		return TagRow{}, false
	}
	t, err := decodeTag(v)
	if err != nil {
		return TagRow{}, false
	}
	r := TagRow{NS: ns, Repo: repo, Tag: tag, Digest: t.Digest, FetchedAt: t.FetchedAt}
	m, err := manifestIn(txn, t.Digest)
	if err != nil {
		return r, true
	}
	r.Stored, r.MediaType, r.Origin = true, m.MediaType, m.Origin
	if at := s.lastUse(txn, t.Digest, 0); at > 0 {
		r.LastUse = time.Unix(0, at)
	}
	seen := map[digest.Digest]bool{t.Digest: true}
	r.Size = int64(len(m.Bytes)) + heldSize(txn, m, seen, 1)
	return r, true
}

// heldSize adds up the sizes of what m holds that seen does not have yet,
// going depth levels into child manifests that are stored.
func heldSize(txn *badger.Txn, m Manifest, seen map[digest.Digest]bool, depth int) int64 {
	held, _, err := References(m.Bytes)
	if err != nil {
		return 0
	}
	var n int64
	for _, h := range held {
		if seen[h.Digest] {
			continue
		}
		seen[h.Digest] = true
		n += max(h.Size, 0)
		if h.Manifest && depth > 0 {
			if child, err := manifestIn(txn, h.Digest); err == nil {
				n += heldSize(txn, child, seen, depth-1)
			}
		}
	}
	return n
}

func manifestIn(txn *badger.Txn, d digest.Digest) (Manifest, error) {
	v, err := getIn(txn, keyManifest(d))
	if err != nil {
		return Manifest{}, err
	}
	return decodeManifest(d, v)
}

// A cursor is a tag key without its prefix byte, in URL-safe base64.
func encodeCursor(k []byte) string { return base64.RawURLEncoding.EncodeToString(k[1:]) }

func decodeCursor(c string) ([]byte, error) {
	if len(c) > maxCursor {
		return nil, ErrBadCursor
	}
	b, err := base64.RawURLEncoding.DecodeString(c)
	if err != nil {
		return nil, ErrBadCursor
	}
	k := append([]byte{prefixTag}, b...)
	if _, _, _, ok := parseTagKey(k); !ok {
		return nil, ErrBadCursor
	}
	return k, nil
}

// displayKey appends how a tag key reads, "ns/repo:tag" or "repo:tag" for
// a local repository, to buf.
func displayKey(buf, k []byte) []byte {
	part := 0
	for _, c := range k[1:] {
		if c != 0 {
			buf = append(buf, c)
			continue
		}
		part++
		switch {
		case part == 1 && len(buf) > 0:
			buf = append(buf, '/')
		case part == 2:
			buf = append(buf, ':')
		}
	}
	return buf
}

func lowerASCII(b []byte) []byte {
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return b
}

// containsFold reports whether hay contains needle (lower case), ignoring
// ASCII case.
func containsFold(hay, needle []byte) bool {
	for i := 0; i+len(needle) <= len(hay); i++ {
		j := 0
		for ; j < len(needle); j++ {
			c := hay[i+j]
			if 'A' <= c && c <= 'Z' {
				c += 'a' - 'A'
			}
			if c != needle[j] {
				break
			}
		}
		if j == len(needle) {
			return true
		}
	}
	return false
}
