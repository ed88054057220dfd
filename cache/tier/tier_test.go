package tier_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"slipway/cache/tier"
	"slipway/cache/tier/tiertest"
)

func newClient(t *testing.T, m *tiertest.Server) *tier.Client {
	t.Helper()
	c, err := tier.New(tier.Config{Endpoint: m.Endpoint, Bucket: "slipway", Prefix: "t/", AccessKey: m.AccessKey, SecretKey: m.SecretKey, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.CreateBucket(context.Background()); err != nil {
		t.Fatal(err)
	}
	return c
}

// Against a real MinIO: blobs are written create-only (a second write of
// the same digest is done, not an error), and every kind of object reads
// back as written.
func TestTierObjects(t *testing.T) {
	m := tiertest.Start(t)
	c := newClient(t, m)
	ctx := context.Background()
	b := []byte("a blob's bytes")
	d := digest.FromBytes(b)
	for range 2 {
		if err := c.PutBlob(ctx, d, bytes.NewReader(b), int64(len(b))); err != nil {
			t.Fatal(err)
		}
	}
	rc, size, err := c.Blob(ctx, d)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(rc)
	rc.Close()
	if !bytes.Equal(got, b) || size != int64(len(b)) {
		t.Fatalf("blob: %q (%d)", got, size)
	}
	if _, _, err := c.Blob(ctx, digest.FromString("none")); !errors.Is(err, tier.ErrNotFound) {
		t.Fatalf("missing blob: %v", err)
	}
	man := []byte(`{"schemaVersion":2}`)
	md := digest.FromBytes(man)
	if err := c.PutManifest(ctx, md, "application/vnd.oci.image.manifest.v1+json", man); err != nil {
		t.Fatal(err)
	}
	if got, mt, err := c.Manifest(ctx, md); err != nil || !bytes.Equal(got, man) || mt != "application/vnd.oci.image.manifest.v1+json" {
		t.Fatalf("manifest: %q %q %v", got, mt, err)
	}
	for _, repo := range []string{"ci/app", "ci/app/tags", "x"} {
		if err := c.AddRepository(ctx, repo); err != nil {
			t.Fatal(err)
		}
	}
	if repos, err := c.Repositories(ctx); err != nil || !slices.Equal(repos, []string{"ci/app", "ci/app/tags", "x"}) {
		t.Fatalf("repositories: %v %v", repos, err)
	}
	for _, tag := range []string{"v1", "latest"} {
		if err := c.SetTag(ctx, "ci/app", tag, md); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.SetTag(ctx, "ci/app/tags", "other", md); err != nil {
		t.Fatal(err)
	}
	if tags, err := c.Tags(ctx, "ci/app"); err != nil || !slices.Equal(tags, []string{"latest", "v1"}) {
		t.Fatalf("tags of ci/app: %v %v (a repository named ci/app/tags must not leak in)", tags, err)
	}
	if got, err := c.Tag(ctx, "ci/app", "v1"); err != nil || got != md {
		t.Fatalf("tag: %v %v", got, err)
	}
	if err := c.DeleteTag(ctx, "ci/app", "v1"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Tag(ctx, "ci/app", "v1"); !errors.Is(err, tier.ErrNotFound) {
		t.Fatalf("deleted tag: %v", err)
	}
	if err := c.Link(ctx, "ci/app", d); err != nil {
		t.Fatal(err)
	}
	if ok, err := c.Linked(ctx, "ci/app", d); !ok || err != nil {
		t.Fatalf("linked: %v %v", ok, err)
	}
	if ok, _ := c.Linked(ctx, "x", d); ok {
		t.Fatal("a link leaked into another repository")
	}
	if err := c.PutReferrer(ctx, "ci/app", md, d, []byte(`{"digest":"x"}`)); err != nil {
		t.Fatal(err)
	}
	if refs, err := c.Referrers(ctx, "ci/app", md); err != nil || len(refs) != 1 {
		t.Fatalf("referrers: %q %v", refs, err)
	}
	at := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	if err := c.SetPulledTag(ctx, "registry-1.docker.io", "library/alpine", "3", tier.PulledTag{Digest: md, FetchedAt: at}); err != nil {
		t.Fatal(err)
	}
	if pt, err := c.GetPulledTag(ctx, "registry-1.docker.io", "library/alpine", "3"); err != nil || pt.Digest != md || !pt.FetchedAt.Equal(at) {
		t.Fatalf("pulled tag: %+v %v", pt, err)
	}
	var roots []digest.Digest
	if err := c.Roots(ctx, func(d digest.Digest) error { roots = append(roots, d); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(roots) != 4 { // link d, tags latest and other, the pulled tag
		t.Errorf("roots: %v", roots)
	}
}

// 32 replicas race for the GC lease: exactly one holds it. It cannot be
// taken while held, can be once it expired, and its holder can update and
// release it.
func TestTierLeaseRace(t *testing.T) {
	m := tiertest.Start(t)
	c := newClient(t, m)
	ctx := context.Background()
	now := time.Now()
	var winners atomic.Int32
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for i := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, ok, err := c.AcquireLease(ctx, "gc", string(rune('A'+i)), time.Minute, now)
			if err != nil {
				errs <- err
			}
			if ok {
				winners.Add(1)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := winners.Load(); n != 1 {
		t.Fatalf("%d of 32 contenders hold the lease, want exactly 1", n)
	}
	l, err := c.ReadLease(ctx, "gc")
	if err != nil || !l.Held(now) {
		t.Fatalf("lease: %+v %v", l, err)
	}
	if _, ok, _ := c.AcquireLease(ctx, "gc", "late", time.Minute, now.Add(time.Second)); ok {
		t.Fatal("a held lease was taken")
	}
	l.Sweeping = true
	if l, err = c.UpdateLease(ctx, "gc", l); err != nil {
		t.Fatal(err)
	}
	if got, _ := c.ReadLease(ctx, "gc"); !got.Sweeping {
		t.Fatal("the update did not land")
	}
	if _, ok, err := c.AcquireLease(ctx, "gc", "later", time.Minute, now.Add(2*time.Minute)); !ok || err != nil {
		t.Fatalf("an expired lease could not be taken: %v", err)
	}
	if _, err := c.UpdateLease(ctx, "gc", l); !errors.Is(err, tier.ErrPrecondition) {
		t.Fatalf("the old holder's update after losing the lease: %v", err)
	}
}

// An object store that is down is ErrUnavailable, and the same client
// works again once it is back.
func TestTierUnavailable(t *testing.T) {
	m := tiertest.Start(t)
	c := newClient(t, m)
	ctx := context.Background()
	m.Stop(t)
	if _, err := c.Tag(ctx, "a", "b"); !errors.Is(err, tier.ErrUnavailable) {
		t.Fatalf("store down: %v", err)
	}
	m.Restart(t)
	if err := c.Link(ctx, "a", digest.FromString("x")); err != nil {
		t.Fatalf("store back: %v", err)
	}
}

// A create-only write of something already there is done, however big:
// the store answers 412 before it reads the body and may close the
// connection under the writer, which must not look like an outage. The
// fleet's conformance run lost a 3.9 MB manifest PUT so.
func TestTierCreateOnceOfALargeObjectThere(t *testing.T) {
	m := tiertest.Start(t)
	c := newClient(t, m)
	ctx := context.Background()
	man := bytes.Repeat([]byte("A"), 4<<20)
	d := digest.FromBytes(man)
	const n = 8
	for round := range 3 {
		var g sync.WaitGroup
		errs := make([]error, n)
		for i := range n {
			g.Add(1)
			go func() {
				defer g.Done()
				errs[i] = c.PutManifest(ctx, d, "application/vnd.oci.image.manifest.v1+json", man)
			}()
		}
		g.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
	}
	got, _, err := c.Manifest(ctx, d)
	if err != nil || !bytes.Equal(got, man) {
		t.Fatalf("manifest reads back %d bytes, %v", len(got), err)
	}
}
