package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"

	"slipway/cache"
	"slipway/cache/tier"
)

// FillerOptions tune a Filler. The zero value is usable.
type FillerOptions struct {
	Logger *slog.Logger
	// Timeout bounds one fill from start to commit. Default 1 hour.
	Timeout time.Duration
	// IdleTimeout cancels a fill whose upstream sent nothing for this long.
	// Default 60 seconds.
	IdleTimeout time.Duration
	// Fleet, if set, makes the fill of a digest this replica does not own
	// read from its owner (after the store's shared tier, if any).
	Fleet *Fleet
	// Observer, if set, hears how each fill ended (metrics).
	Observer Observer
}

// Filler fills the cache from upstreams: at most one fill per digest at a
// time, however many clients ask. A fill runs on the Filler's own context
// (service lifetime plus a timeout), never on a client's, so a client that
// leaves does not stop it; every client reads the growing temp file while it
// fills.
type Filler struct {
	store   *cache.Store
	log     *slog.Logger
	timeout time.Duration
	idle    time.Duration

	fleet  *Fleet
	obs    Observer
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu    sync.Mutex
	fills map[digest.Digest]*fill
	joins atomic.Int64 // requests that joined a fill another started
}

type fill struct {
	ns, repo string
	hop      bool          // for a peer: never asks another peer
	local    bool          // of a local repository: from the shared tier only
	started  chan struct{} // closed once w and size are set, or err
	w        *cache.BlobWriter
	size     int64
	err      error

	waiters  atomic.Int64 // clients reading it now (see follow)
	progress progress     // for Stalled, the Observer and the status page
}

// NewFiller returns a Filler that stores into s.
func NewFiller(s *cache.Store, o FillerOptions) *Filler {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Timeout <= 0 {
		o.Timeout = time.Hour
	}
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = 60 * time.Second
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Filler{
		store: s, log: o.Logger, timeout: o.Timeout, idle: o.IdleTimeout, fleet: o.Fleet, obs: o.Observer,
		ctx: ctx, cancel: cancel, fills: make(map[digest.Digest]*fill),
	}
}

// Close cancels the fills in flight and waits for them to end. Their
// waiters get an error; nothing partial is stored.
func (f *Filler) Close() {
	f.cancel()
	f.wg.Wait()
}

// InFlight is the number of fills running now.
func (f *Filler) InFlight() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.fills)
}

// Joins counts the requests that joined a fill already in flight instead
// of starting one; metrics read it.
func (f *Filler) Joins() int64 { return f.joins.Load() }

// Blob is a blob on its way to a client: a stored file (serve it with
// http.ServeContent) or a stream from a fill in progress.
type Blob struct {
	File   *os.File      // set when the blob is stored
	Reader io.ReadCloser // set when it streams from a fill
	Size   int64         // -1 if unknown
	Source Source
}

// Close releases the file or stream.
func (b *Blob) Close() error {
	if b.File != nil {
		return b.File.Close()
	}
	if b.Reader != nil {
		return b.Reader.Close()
	}
	return nil
}

// fetch returns blob d of repo on up: from the store if it is there by now,
// else by joining the fill in progress or starting one. A client joining a
// fill that another repository started must first be confirmed by its own
// upstream (invariant 9).
func (f *Filler) fetch(ctx context.Context, up *Client, repo string, d digest.Digest) (*Blob, error) {
	return f.start(ctx, up, repo, d, false)
}

// FetchShared returns blob d of a local repository that this replica of a
// fleet does not hold: from the store's shared tier, while it is copied
// here. The caller checked that the repository holds it.
func (f *Filler) FetchShared(ctx context.Context, d digest.Digest) (*Blob, error) {
	if f.store.Shared() == nil {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, d)
	}
	return f.start(ctx, nil, "", d, true)
}

func (f *Filler) start(ctx context.Context, up *Client, repo string, d digest.Digest, local bool) (*Blob, error) {
	ns := ""
	if up != nil {
		ns = up.Host()
	}
	f.mu.Lock()
	// The store first, even with a fill in flight: a fill indexes its blob
	// before its readers get the last byte and leaves the fills only
	// after, so a reader that has it and asks again (a Range request does)
	// gets the stored file, not the fill that is finishing. And a fill
	// removes itself only after indexing, so checking the store under the
	// lock cannot miss one that just finished.
	if file, info, err := f.store.OpenBlob(d); err == nil {
		f.mu.Unlock()
		if !local {
			if err := confirmBlob(ctx, f.store, up, repo, d); err != nil {
				file.Close()
				return nil, err
			}
		}
		return &Blob{File: file, Size: info.Size, Source: SourceHit}, nil
	}
	fl, joined := f.fills[d]
	if !joined {
		if err := f.ctx.Err(); err != nil {
			f.mu.Unlock()
			return nil, fmt.Errorf("%w: shutting down", ErrUnavailable)
		}
		fl = &fill{ns: ns, repo: repo, hop: IsHop(ctx), local: local, started: make(chan struct{})}
		fl.progress.begin()
		f.fills[d] = fl
		f.wg.Add(1)
		go f.run(fl, up, repo, d)
	}
	f.mu.Unlock()
	if joined {
		f.joins.Add(1)
	}

	if joined && !local && (fl.ns != ns || fl.repo != repo) {
		if err := confirmBlob(ctx, f.store, up, repo, d); err != nil {
			return nil, err
		}
	}
	select {
	case <-fl.started:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if fl.err != nil {
		return nil, fl.err
	}
	r, err := fl.w.Follow(ctx)
	if err != nil {
		return nil, err
	}
	r = fl.follow(r)
	src := SourceMiss
	if joined {
		src = SourceJoined
	}
	return &Blob{Reader: r, Size: fl.size, Source: src}, nil
}

// confirmBlob checks that repo may read stored blob d: it references it, or
// its upstream says (with a HEAD, no download) that it has it.
func confirmBlob(ctx context.Context, s *cache.Store, up *Client, repo string, d digest.Digest) error {
	ok, err := s.Linked(up.Host(), repo, d)
	if err != nil || ok {
		return err
	}
	if _, err := up.HeadBlob(ctx, repo, d); err != nil {
		return err
	}
	return s.Link(up.Host(), repo, d)
}

// run is one fill: a GET (from the shared tier, the owner, or the
// upstream), streamed into a BlobWriter, verified, committed.
func (f *Filler) run(fl *fill, up *Client, repo string, d digest.Digest) {
	defer f.wg.Done()
	start := time.Now()
	ctx, cancel := context.WithTimeout(f.ctx, f.timeout)
	defer cancel()

	from, err := f.fill(ctx, cancel, fl, up, repo, d)

	f.mu.Lock()
	f.forgetLocked(d, fl)
	if fl.w == nil { // never started: tell the waiters why
		fl.err = err
		close(fl.started)
	}
	f.mu.Unlock()
	if f.obs != nil {
		f.obs.ObserveFill(fl.progress.report(fl.ns, from, err))
	}

	if err != nil {
		f.log.Warn("fill failed", "upstream", fl.ns, "repo", repo, "digest", d, "from", from, "dur", time.Since(start), "err", err)
		return
	}
	f.log.Info("fill done", "upstream", fl.ns, "repo", repo, "digest", d, "from", from, "bytes", fl.size, "dur", time.Since(start))
}

// source opens the blob's body: from the store's shared tier if it has it,
// else (for a proxied repository) from the digest's owner in the fleet if
// that is another replica, else from the upstream. It says which.
func (f *Filler) source(ctx context.Context, fl *fill, up *Client, repo string, d digest.Digest) (io.ReadCloser, int64, string, error) {
	if sh := f.store.Shared(); sh != nil {
		body, size, err := sh.Blob(ctx, d)
		switch {
		case err == nil && !fl.local:
			// The shared tier holds what any repository pulled: this
			// one must reference it (invariant 9), as for a stored blob.
			if err := confirmBlob(ctx, f.store, up, repo, d); err != nil {
				body.Close()
				return nil, 0, "shared", err
			}
			return body, size, "shared", nil
		case err == nil:
			return body, size, "shared", nil
		case fl.local:
			return nil, 0, "shared", fmt.Errorf("%w: %s in the shared tier: %v", ErrUnavailable, d, err)
		case !errors.Is(err, tier.ErrNotFound):
			f.log.Warn("the shared tier is unavailable: filling from elsewhere", "digest", d, "err", err)
		}
	}
	if f.fleet != nil && !fl.hop {
		if owner, self := f.fleet.Owner(string(d)); !self {
			body, size, err := f.fleet.GetBlob(ctx, owner, up.Host(), repo, d)
			if err == nil {
				return body, size, "peer " + owner, nil
			}
			if !errors.Is(err, ErrPeerDown) {
				return nil, 0, "peer " + owner, err
			}
			f.log.Warn("fleet: the owner is unreachable: filling from the upstream", "peer", owner, "digest", d, "err", err)
		}
	}
	body, size, err := up.GetBlob(ctx, repo, d)
	return body, size, "upstream", err
}

func (f *Filler) fill(ctx context.Context, cancel context.CancelFunc, fl *fill, up *Client, repo string, d digest.Digest) (string, error) {
	w, err := f.store.NewBlobWriter(d.Algorithm())
	if err != nil {
		return "", err
	}
	defer w.Cancel()
	body, size, from, err := f.source(ctx, fl, up, repo, d)
	if err != nil {
		return from, err
	}
	defer body.Close()
	if from != "upstream" {
		w.FromShared() // the shared tier has it, or its owner puts it there
	}

	f.mu.Lock()
	fl.w, fl.size = w, size
	close(fl.started)
	f.mu.Unlock()

	// A source that stops sending cancels the fill after the idle timeout.
	idle := time.AfterFunc(f.idle, cancel)
	defer idle.Stop()
	bufp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bufp)
	_, err = io.CopyBuffer(w, &idleReader{r: body, t: idle, d: f.idle, p: &fl.progress}, *bufp)
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w: fill of %s: %v", ErrUnavailable, d, context.Cause(ctx))
		} else if !errors.Is(err, cache.ErrCanceled) && !errors.Is(err, cache.ErrNoSpace) {
			err = classify(err)
		}
		// A request from now on starts a fill of its own rather than
		// joining this one's failure.
		f.mu.Lock()
		f.forgetLocked(d, fl)
		f.mu.Unlock()
		w.Abort(err)
		return from, err
	}
	origin := cache.OriginPulled
	if fl.local {
		origin = cache.OriginPushed
	}
	if err := w.Commit(d, size, origin); err != nil {
		return from, err
	}
	if fl.local {
		return from, nil
	}
	return from, f.store.Link(up.Host(), repo, d)
}

// forgetLocked drops fill fl of d from the fills new requests join, if it
// is still the one there.
func (f *Filler) forgetLocked(d digest.Digest, fl *fill) {
	if f.fills[d] == fl {
		delete(f.fills, d)
	}
}

// copyBufs are big enough that one fill wakes its followers rarely.
var copyBufs = sync.Pool{New: func() any { b := make([]byte, 256<<10); return &b }}

type idleReader struct {
	r io.Reader
	t *time.Timer
	d time.Duration
	p *progress
}

func (r *idleReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if n > 0 {
		r.t.Reset(r.d)
		r.p.note()
	}
	return n, err
}
