package cache

import (
	"math"
	"time"

	"github.com/opencontainers/go-digest"
)

// EvictCandidate is a blob or manifest eviction may remove.
type EvictCandidate struct {
	Digest  digest.Digest `json:"digest"`
	Kind    string        `json:"kind"` // "blob" or "manifest"
	Size    int64         `json:"size"`
	LastUse time.Time     `json:"last_use"`
}

// MaxEvictNext bounds EvictNext's list.
const MaxEvictNext = 100

// EvictNext lists the n (at most MaxEvictNext) least recently used blobs
// and manifests that eviction may remove, oldest first: what the next
// pass takes first, whatever the watermarks say now. It applies the plan's
// rules (pulled, not pinned, not open by a reader) and writes nothing; the
// pass itself asks the rule again for each one as it acts (see live.go).
// It reads the whole blob and manifest index, so callers that ask often
// should keep its answer a while.
func (s *Store) EvictNext(n int) ([]EvictCandidate, error) {
	n = min(n, MaxEvictNext)
	if n <= 0 {
		return nil, nil
	}
	pins, err := s.pinned()
	if err != nil {
		return nil, err
	}
	sel := selection{need: math.MaxInt64, max: n}
	if err := s.eachEvictable(pins, sel.offer); err != nil {
		return nil, err
	}
	next := sel.oldestFirst()
	out := make([]EvictCandidate, len(next))
	for i, c := range next {
		out[i] = EvictCandidate{Digest: c.digest(), Kind: c.k.String(), Size: c.size}
		if c.at > 0 {
			out[i].LastUse = time.Unix(0, c.at)
		}
	}
	return out, nil
}
