package upstream

import (
	"io"
	"slices"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"slipway/cache"
)

// FillStatus is one fill in flight, as the status page shows it.
type FillStatus struct {
	Digest digest.Digest
	// Upstream is the host the blob is filled for ("" for a local
	// repository's blob read from a fleet's shared tier), Repo the
	// repository that asked first.
	Upstream, Repo string
	Bytes          int64 // stored so far
	Size           int64 // the whole blob; -1 until known (or if the source did not say)
	Started        time.Time
	Waiters        int // clients reading it now
}

// Fills lists the fills in flight, oldest first. It holds the Filler's
// lock only to copy what it needs; the bytes so far come from each fill's
// writer afterwards.
func (f *Filler) Fills() []FillStatus {
	type running struct {
		st FillStatus
		w  *cache.BlobWriter
	}
	f.mu.Lock()
	rs := make([]running, 0, len(f.fills))
	for d, fl := range f.fills {
		size := int64(-1)
		if fl.w != nil {
			size = fl.size
		}
		rs = append(rs, running{w: fl.w, st: FillStatus{Digest: d, Upstream: fl.ns, Repo: fl.repo, Size: size,
			Started: fl.progress.start, Waiters: int(fl.waiters.Load())}})
	}
	f.mu.Unlock()
	out := make([]FillStatus, len(rs))
	for i, r := range rs {
		out[i] = r.st
		if r.w != nil {
			out[i].Bytes = r.w.Size()
		}
	}
	slices.SortFunc(out, func(a, b FillStatus) int {
		if c := a.Started.Compare(b.Started); c != 0 {
			return c
		}
		return slices.Compare([]byte(a.Digest), []byte(b.Digest))
	})
	return out
}

// follow counts r as a waiter of fl until it is closed.
func (fl *fill) follow(r io.ReadCloser) io.ReadCloser {
	fl.waiters.Add(1)
	return &waiter{ReadCloser: r, fl: fl}
}

// waiter is a client's reader of a fill. It passes WriteTo on, so a
// response still gets the follower's sendfile path.
type waiter struct {
	io.ReadCloser
	fl   *fill
	once sync.Once
}

func (r *waiter) WriteTo(w io.Writer) (int64, error) {
	if wt, ok := r.ReadCloser.(io.WriterTo); ok {
		return wt.WriteTo(w)
	}
	return io.Copy(w, struct{ io.Reader }{r.ReadCloser})
}

func (r *waiter) Close() error {
	r.once.Do(func() { r.fl.waiters.Add(-1) })
	return r.ReadCloser.Close()
}
