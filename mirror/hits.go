package mirror

import (
	"slices"
	"sync"
	"time"

	"slipway/upstream"
)

// hitWindow counts the cache's answers to proxied manifest and blob
// requests in 10-second slots over the last hour, in memory, so that the
// status page has the hit ratio over 5 minutes and over the hour without a
// Prometheus to ask. A hit is "hit" or "revalidated"; "stale", "miss" and
// "joined" count only in the total; "upstream" (a HEAD answered by the
// upstream) and "local" (a pushed repository) are not cache answers.
type hitWindow struct {
	now func() time.Time // nil: time.Now

	mu    sync.Mutex
	slots [hitSlots]hitSlot
}

const (
	hitSlot10s = 10 * time.Second
	hitSlots   = int(time.Hour / hitSlot10s)
)

type hitSlot struct {
	n           int64 // which slot (unix time / 10 s); a slot of another n is old
	hits, total uint64
}

func (w *hitWindow) slot(t time.Time) int64 { return t.Unix() / int64(hitSlot10s/time.Second) }

func (w *hitWindow) clock() time.Time {
	if w.now != nil {
		return w.now()
	}
	return time.Now()
}

// note counts one answer.
func (w *hitWindow) note(hit bool) {
	n := w.slot(w.clock())
	w.mu.Lock()
	defer w.mu.Unlock()
	s := &w.slots[n%int64(hitSlots)]
	if s.n != n {
		*s = hitSlot{n: n}
	}
	s.total++
	if hit {
		s.hits++
	}
}

// over sums the answers of the slots that began within d of now (d is
// rounded up to whole slots, at most an hour), the current slot included.
func (w *hitWindow) over(d time.Duration) hitRatio {
	now := w.slot(w.clock())
	k := min(int64((d+hitSlot10s-1)/hitSlot10s), int64(hitSlots))
	w.mu.Lock()
	defer w.mu.Unlock()
	var r hitRatio
	for _, s := range w.slots {
		if s.n > now-k && s.n <= now {
			r.Hits += s.hits
			r.Total += s.total
		}
	}
	if r.Total > 0 {
		ratio := float64(r.Hits) / float64(r.Total)
		r.Ratio = &ratio
	}
	return r
}

// The cache answers the hit ratio counts, here and in the rules and
// dashboard slipway prints: a hit is a fresh or revalidated answer from
// the cache; a miss, a joined fetch or a stale answer is not. A HEAD the
// upstream answered and a pushed repository's answer are no cache answers.
var (
	hitResults  = []upstream.Source{upstream.SourceHit, upstream.SourceRevalidated}
	missResults = []upstream.Source{upstream.SourceMiss, upstream.SourceJoined, upstream.SourceStale}
)

// isHit tells a cache answer's result: a hit, a miss, or none (ok false).
func isHit(src upstream.Source) (hit, ok bool) {
	if slices.Contains(hitResults, src) {
		return true, true
	}
	return false, slices.Contains(missResults, src)
}

// hitRatio is hits of total answers; Ratio is nil when there were none.
type hitRatio struct {
	Hits  uint64   `json:"hits"`
	Total uint64   `json:"total"`
	Ratio *float64 `json:"ratio"`
}
