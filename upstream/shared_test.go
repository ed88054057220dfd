package upstream

import (
	"bytes"
	"context"
	"io"
	"testing"
	"time"

	"slipway/cache"
	"slipway/cache/tier"
	"slipway/cache/tier/tiertest"
)

// A blob of a local repository that this replica lacks comes from the
// shared tier; once its reader has the last byte, opening it again gives
// the stored file, never a fill that is only finishing (a Range request
// opens it again so, and got 503 "being fetched again" in the fleet's
// conformance run).
func TestFetchSharedAgainAfterTheLastByteGivesTheStoredFile(t *testing.T) {
	m := tiertest.Start(t)
	c, err := tier.New(tier.Config{Endpoint: m.Endpoint, Bucket: "slipway", AccessKey: m.AccessKey, SecretKey: m.SecretKey, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := c.CreateBucket(ctx); err != nil {
		t.Fatal(err)
	}
	s, err := cache.Open(t.TempDir(), cache.Options{Shared: c, GCEvery: -1, MaintenanceInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	f := NewFiller(s, FillerOptions{})
	defer f.Close()
	for i := range 100 {
		b, d := randBlob(t, 64<<10+i)
		if err := c.PutBlob(ctx, d, bytes.NewReader(b), int64(len(b))); err != nil {
			t.Fatal(err)
		}
		blob, err := f.FetchShared(ctx, d)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(blob.Reader)
		blob.Close()
		if err != nil || !bytes.Equal(got, b) {
			t.Fatalf("blob %d from the shared tier: %v, %d bytes", i, err, len(got))
		}
		again, err := f.FetchShared(ctx, d)
		if err != nil {
			t.Fatal(err)
		}
		again.Close()
		if again.File == nil {
			t.Fatalf("blob %d: opened again after its last byte, it is %s from a fill, not the stored file", i, again.Source)
		}
	}
}
