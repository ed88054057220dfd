package cache

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/opencontainers/go-digest"

	"slipway/cache/tier"
)

// GC of the shared tier: one replica at a time, under the "gc" lease
// (written with conditional PUTs, so of any number of replicas that race
// for it one wins). It follows the rule of live.go as far as the shared
// tier can tell: a manifest stays while a pushed repository's tag or link,
// a pulled tag or a live index names it; a blob while a live manifest holds
// it; anything stays while it is younger than the grace. The tier keeps no
// access times: "used" is "written".
//
// A manifest PUT must not lose a blob to a sweep that began before its
// writes and so did not see them. The sweeper marks the lease Sweeping
// before it looks at what is live; a manifest PUT, after its writes, waits
// out a sweep that is marked, then checks that every blob it holds is
// still there (and puts it back from its own disk if not, or refuses the
// push). A sweep that begins after the check sees the manifest.

const (
	gcLease    = "gc"
	gcLeaseTTL = 10 * time.Minute
)

// SharedGCReport says what a GC pass of the shared tier did.
type SharedGCReport struct {
	Held      bool          `json:"held"` // false: another replica holds the lease
	Live      int           `json:"live_digests"`
	Blobs     int           `json:"blobs"`
	Bytes     int64         `json:"bytes"`
	Manifests int           `json:"manifests"`
	Dur       time.Duration `json:"duration_ns"`
}

// SharedGC runs a GC pass over the shared tier if it can take the lease.
func (s *Store) SharedGC(ctx context.Context, o GCOptions) (SharedGCReport, error) {
	if s.shared == nil {
		return SharedGCReport{}, nil
	}
	grace := s.opt.GCGrace
	if o.Grace > 0 {
		grace = o.Grace
	}
	if s.opt.MinGCGrace > 0 && grace < s.opt.MinGCGrace {
		return SharedGCReport{}, fmt.Errorf("%w: %s, the minimum is %s", ErrGraceTooShort, grace, s.opt.MinGCGrace)
	}
	start := time.Now()
	holder := s.opt.UploadIDPrefix
	if holder == "" {
		holder, _ = os.Hostname()
	}
	lease, ok, err := s.shared.AcquireLease(ctx, gcLease, holder, gcLeaseTTL, time.Now())
	if err != nil || !ok {
		return SharedGCReport{}, sharedErr(err)
	}
	r := SharedGCReport{Held: true}
	if !o.DryRun {
		lease.Sweeping = true
		if lease, err = s.shared.UpdateLease(ctx, gcLease, lease); err != nil {
			return r, sharedErr(err)
		}
	}
	defer func() { s.shared.ReleaseLease(context.WithoutCancel(ctx), gcLease, lease) }()

	live, err := s.sharedLive(ctx)
	if err != nil {
		return r, err
	}
	r.Live = len(live)
	cutoff := time.Now().Add(-grace)
	renewed := time.Now()
	sweep := func(list func(context.Context, func(tier.Object) error) error, del func(context.Context, digest.Digest) error, count func(tier.Object)) error {
		return list(ctx, func(obj tier.Object) error {
			if live[obj.Digest] || !obj.Modified.Before(cutoff) {
				return nil
			}
			if time.Since(renewed) > gcLeaseTTL/4 {
				lease.Until = time.Now().Add(gcLeaseTTL)
				var err error
				if lease, err = s.shared.UpdateLease(ctx, gcLease, lease); err != nil {
					return fmt.Errorf("cache: lost the shared GC lease: %w", err)
				}
				renewed = time.Now()
			}
			if !o.DryRun {
				if err := del(ctx, obj.Digest); err != nil {
					return err
				}
			}
			count(obj)
			return nil
		})
	}
	if err := sweep(s.shared.Manifests, s.shared.DeleteManifest, func(tier.Object) { r.Manifests++ }); err != nil {
		return r, sharedErr(err)
	}
	if err := sweep(s.shared.Blobs, s.shared.DeleteBlob, func(obj tier.Object) { r.Blobs++; r.Bytes += obj.Size }); err != nil {
		return r, sharedErr(err)
	}
	r.Dur = time.Since(start)
	if r.Blobs+r.Manifests > 0 && !o.DryRun {
		s.log.Info("shared gc", "blobs", r.Blobs, "bytes", r.Bytes, "manifests", r.Manifests, "dur", r.Dur)
	}
	return r, nil
}

// sharedLive is what the shared tier's roots keep: the manifests that tags
// and links name (a link to a blob keeps nothing: only a manifest holds a
// blob), and everything they hold, through indexes.
func (s *Store) sharedLive(ctx context.Context) (map[digest.Digest]bool, error) {
	var roots []digest.Digest
	if err := s.shared.Roots(ctx, func(d digest.Digest) error {
		roots = append(roots, d)
		return nil
	}); err != nil {
		return nil, sharedErr(err)
	}
	live := map[digest.Digest]bool{}
	expand := func(d digest.Digest) error {
		b, _, err := s.shared.Manifest(ctx, d)
		if errors.Is(err, tier.ErrNotFound) {
			return nil // a blob: a root does not keep it
		}
		if err != nil {
			return sharedErr(err)
		}
		live[d] = true
		held, _, err := References(b)
		if err != nil {
			return nil
		}
		for _, h := range held {
			if !live[h.Digest] {
				live[h.Digest] = true
				if h.Manifest {
					roots = append(roots, h.Digest)
				}
			}
		}
		return nil
	}
	seen := map[digest.Digest]bool{}
	for len(roots) > 0 {
		d := roots[len(roots)-1]
		roots = roots[:len(roots)-1]
		if seen[d] {
			continue
		}
		seen[d] = true
		if err := expand(d); err != nil {
			return nil, err
		}
	}
	return live, nil
}

// awaitSweep waits while a shared GC sweep is marked in its lease (see
// above); a sweep that does not end within ctx is ErrSharedUnavailable.
func (s *Store) awaitSweep(ctx context.Context) error {
	for {
		l, err := s.shared.ReadLease(ctx, gcLease)
		if err != nil {
			return sharedErr(err)
		}
		if !l.Sweeping || !l.Held(time.Now()) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: a GC sweep of the shared tier is still running", ErrSharedUnavailable)
		case <-time.After(200 * time.Millisecond):
		}
	}
}
