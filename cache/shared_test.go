package cache

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"slipway/cache/tier"
	"slipway/cache/tier/tiertest"
)

// openShared opens a store on a real MinIO bucket.
func openShared(t *testing.T, m *tiertest.Server, prefix string) (*Store, *tier.Client) {
	t.Helper()
	c, err := tier.New(tier.Config{Endpoint: m.Endpoint, Bucket: "slipway", Prefix: prefix, AccessKey: m.AccessKey, SecretKey: m.SecretKey, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.CreateBucket(context.Background()); err != nil {
		t.Fatal(err)
	}
	s, err := Open(t.TempDir(), Options{Shared: c, MinGCGrace: -1, GCEvery: -1, MaintenanceInterval: time.Hour, UploadIDPrefix: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, c
}

func pushShared(t *testing.T, s *Store, repo string, b []byte) digest.Digest {
	t.Helper()
	d := digest.FromBytes(b)
	if err := s.WriteDeclared(d, bytes.NewReader(b), int64(len(b)), OriginPushed); err != nil {
		t.Fatal(err)
	}
	if err := s.Link("", repo, d); err != nil {
		t.Fatal(err)
	}
	return d
}

// GC of the shared tier keeps what a tag or link keeps and what its
// manifests hold; it removes a blob no manifest holds and a manifest
// nothing names, once they are older than the grace.
func TestSharedGC(t *testing.T) {
	m := tiertest.Start(t)
	s, c := openShared(t, m, "gc/")
	ctx := context.Background()
	cb, lb, orphan := []byte(`{"os":"linux"}`), []byte("a layer"), []byte("pushed, never in a manifest")
	cd, ld, od := pushShared(t, s, "ci/app", cb), pushShared(t, s, "ci/app", lb), pushShared(t, s, "ci/app", orphan)
	man := manifestOf(cb, lb)
	md := digest.FromBytes(man)
	if err := s.PutManifest(ManifestPut{Repo: "ci/app", Tags: []string{"v1"}, Local: true,
		Manifest: Manifest{Digest: md, MediaType: ociManifest, Bytes: man, Origin: OriginPushed}}); err != nil {
		t.Fatal(err)
	}
	gone := []byte("a layer of a manifest deleted later")
	gd := pushShared(t, s, "ci/old", gone)
	pushShared(t, s, "ci/old", cb)
	oldMan := manifestOf(cb, gone)
	omd := digest.FromBytes(oldMan)
	if err := s.PutManifest(ManifestPut{Repo: "ci/old", Tags: []string{"v0"}, Local: true,
		Manifest: Manifest{Digest: omd, MediaType: ociManifest, Bytes: oldMan, Origin: OriginPushed}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RemoveFromRepository("", "ci/old", omd); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1100 * time.Millisecond) // object times are in whole seconds
	r, err := s.SharedGC(ctx, GCOptions{Grace: time.Nanosecond})
	if err != nil || !r.Held {
		t.Fatalf("shared GC: %+v %v", r, err)
	}
	has := func(d digest.Digest) bool {
		if _, err := c.StatBlob(ctx, d); err == nil {
			return true
		}
		_, _, err := c.Manifest(ctx, d)
		return err == nil
	}
	for _, d := range []digest.Digest{cd, ld, md} {
		if !has(d) {
			t.Errorf("%s of the tagged image was removed", d)
		}
	}
	for _, d := range []digest.Digest{od, gd, omd} {
		if has(d) {
			t.Errorf("%s, which nothing keeps, is still there", d)
		}
	}
	// A second pass has nothing to do; a third replica's would wait.
	if r, err := s.SharedGC(ctx, GCOptions{Grace: time.Nanosecond}); err != nil || r.Blobs+r.Manifests != 0 {
		t.Errorf("second pass: %+v %v", r, err)
	}
}

// A manifest PUT waits out a GC sweep that is marked in the lease: its
// answer never comes while a sweep that may not have seen it runs.
func TestManifestPutWaitsForASharedSweep(t *testing.T) {
	m := tiertest.Start(t)
	s, c := openShared(t, m, "fence/")
	ctx := context.Background()
	cb, lb := []byte(`{"os":"linux"}`), []byte("a layer")
	pushShared(t, s, "ci/app", cb)
	pushShared(t, s, "ci/app", lb)
	l, ok, err := c.AcquireLease(ctx, gcLease, "another replica", time.Minute, time.Now())
	if err != nil || !ok {
		t.Fatalf("lease: %v %v", ok, err)
	}
	l.Sweeping = true
	if l, err = c.UpdateLease(ctx, gcLease, l); err != nil {
		t.Fatal(err)
	}
	man := manifestOf(cb, lb)
	done := make(chan error, 1)
	go func() {
		done <- s.PutManifest(ManifestPut{Repo: "ci/app", Tags: []string{"v1"}, Local: true,
			Manifest: Manifest{Digest: digest.FromBytes(man), MediaType: ociManifest, Bytes: man, Origin: OriginPushed}})
	}()
	select {
	case err := <-done:
		t.Fatalf("the PUT answered (%v) while a sweep ran", err)
	case <-time.After(500 * time.Millisecond):
	}
	if err := c.ReleaseLease(ctx, gcLease, l); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the PUT after the sweep: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the PUT never answered after the sweep ended")
	}
}

// What a fill stores goes to the shared tier behind the answer, through
// a queue kept in the index; a queued blob is not evicted here before it
// went; a blob pushed again renews its time in the shared tier.
func TestSharedQueue(t *testing.T) {
	m := tiertest.Start(t)
	s, c := openShared(t, m, "queue/")
	ctx := context.Background()
	m.Stop(t)
	b, d := blobOf(7, 4000)
	if err := s.PutBlob(bytes.NewReader(b), d, OriginPulled); err != nil {
		t.Fatal(err)
	}
	if n, _ := s.QueueLen(); n != 1 {
		t.Fatalf("queue length %d, want 1", n)
	}
	if _, err := s.Evict(0, false); err != nil {
		t.Fatal(err)
	}
	if !has(s, d) {
		t.Fatal("a blob still queued for the shared tier was evicted")
	}
	if _, err := s.DrainQueue(10); !errors.Is(err, tier.ErrUnavailable) {
		t.Fatalf("drain with the tier down: %v", err)
	}
	m.Restart(t)
	if n, err := s.DrainQueue(10); err != nil || n != 1 {
		t.Fatalf("drain: %d %v", n, err)
	}
	if _, err := c.StatBlob(ctx, d); err != nil {
		t.Fatalf("the queued blob is not in the shared tier: %v", err)
	}
	if _, err := s.Evict(0, false); err != nil || has(s, d) {
		t.Fatalf("once sent, the blob is evicted like any: %v, still here %v", err, has(s, d))
	}
}
