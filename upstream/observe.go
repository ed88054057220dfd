package upstream

import (
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// Observer hears how fills and upstream requests went, as each one ends, so
// that mirror can keep latency histograms without this package importing
// prometheus. Its methods run on the goroutine that did the work: they must
// be quick and must not block.
type Observer interface {
	ObserveFill(FillReport)
	ObserveUpstreamRequest(RequestReport)
}

// FillReport is how one fill ended.
type FillReport struct {
	// Upstream is the upstream's host; empty for a local repository's blob
	// copied from the shared tier.
	Upstream string
	// From is where the bytes came from: FromUpstream, FromShared or
	// FromPeer; empty if the fill failed before it chose.
	From string
	// FirstByte is the time from the fill's start to its first body byte
	// (a connection slot, the token, the response headers and a redirect
	// all come before it); 0 if no byte came.
	FirstByte time.Duration
	// Duration is the time from the fill's start to its commit or failure.
	Duration time.Duration
	// Err is nil when the blob was verified and stored.
	Err error
}

// Where a fill's bytes came from, in a FillReport.
const (
	FromUpstream = "upstream"
	FromShared   = "shared"
	FromPeer     = "peer"
)

// RequestReport is one request sent to an upstream registry.
type RequestReport struct {
	Upstream string // the upstream's host
	// Duration is the time until the response headers came, or the
	// request failed; a token exchange the transport repeats after a 401
	// is part of it, waiting for a connection slot is not.
	Duration time.Duration
}

// fromKind is a fill's source as a FillReport names it: "peer <owner>" is
// FromPeer, so that the owner's address does not become a label value.
func fromKind(from string) string {
	if strings.HasPrefix(from, FromPeer) {
		return FromPeer
	}
	return from
}

// progress is how far one fill got, read by Stalled while it runs and
// reported when it ends. Times are nanoseconds since start (monotonic).
type progress struct {
	start time.Time
	first atomic.Int64 // until the first body byte, plus one; 0: none yet
	last  atomic.Int64 // until the last body byte; 0: none yet
}

func (p *progress) begin() { p.start = time.Now() }

// note records that body bytes arrived now.
func (p *progress) note() {
	d := int64(time.Since(p.start))
	p.first.CompareAndSwap(0, d+1)
	p.last.Store(d)
}

// stalled is how long the fill has gone without a body byte: since its
// last one, or since it started if none came yet.
func (p *progress) stalled(now time.Time) time.Duration {
	return now.Sub(p.start) - time.Duration(p.last.Load())
}

func (p *progress) report(up, from string, err error) FillReport {
	r := FillReport{Upstream: up, From: fromKind(from), Duration: time.Since(p.start), Err: err}
	if f := p.first.Load(); f > 0 {
		r.FirstByte = time.Duration(f - 1)
	}
	return r
}

// Stalled is the longest time any fill in flight has gone without
// receiving a byte (waiting for a connection slot, the response headers,
// the next bytes or the disk); 0 when none is in flight. The idle timeout
// cancels a fill whose body stops, so a value well past IdleTimeout means
// a fill is stuck where that timer does not reach.
func (f *Filler) Stalled() time.Duration {
	now := time.Now()
	f.mu.Lock()
	defer f.mu.Unlock()
	var longest time.Duration
	for _, fl := range f.fills {
		longest = max(longest, fl.progress.stalled(now))
	}
	return longest
}

// IdleTimeout is how long a fill's source may send nothing before the fill
// is canceled.
func (f *Filler) IdleTimeout() time.Duration { return f.idle }

// RateLimit is the last ratelimit-limit the upstream reported (Docker
// Hub's pulls per window), or -1.
func (c *Client) RateLimit() int64 { return c.rateLimit.Load() }

// parseRateLimit reads the count of a ratelimit-limit or -remaining header
// ("100;w=21600").
func parseRateLimit(v string) (int64, bool) {
	if v == "" {
		return 0, false
	}
	n, err := strconv.ParseInt(strings.TrimSpace(strings.SplitN(v, ";", 2)[0]), 10, 64)
	return n, err == nil
}

// observeRequest reports one request that took d.
func (c *Client) observeRequest(d time.Duration) {
	if c.observer != nil {
		c.observer.ObserveUpstreamRequest(RequestReport{Upstream: c.Host(), Duration: d})
	}
}
