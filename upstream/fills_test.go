package upstream

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// A fill held halfway shows in Fills with its bytes so far, its size and
// its waiters; waiters that close leave the count; a finished fill leaves
// the list.
func TestFillsListsFillsInFlightWithProgressAndWaiters(t *testing.T) {
	b, d := randBlob(t, 1<<20)
	release := make(chan struct{})
	srv, _ := stallingUpstream(t, d, b, release)
	store := newTestStore(t)
	c, _ := New(Config{URL: srv.URL})
	f := NewFiller(store, FillerOptions{})
	defer f.Close()
	p := NewProxy(c, store, f, ProxyOptions{})
	if got := f.Fills(); len(got) != 0 {
		t.Fatalf("no fill yet, Fills says %+v", got)
	}

	before := time.Now()
	first, err := p.Blob(context.Background(), "team/app", d)
	if err != nil {
		t.Fatal(err)
	}
	second, err := p.Blob(context.Background(), "team/app", d)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(first.Reader, make([]byte, 1024)); err != nil {
		t.Fatal(err)
	}
	var st FillStatus
	waitUntil(t, "the first half stored", func() bool {
		fs := f.Fills()
		if len(fs) == 1 {
			st = fs[0]
		}
		return len(fs) == 1 && st.Bytes == int64(len(b)/2)
	})
	if st.Digest != d || st.Upstream != c.Host() || st.Repo != "team/app" || st.Size != int64(len(b)) ||
		st.Waiters != 2 || st.Started.Before(before.Add(-time.Second)) || st.Started.After(time.Now()) {
		t.Errorf("fill status %+v: want digest %s, upstream %s, repo team/app, size %d, 2 waiters", st, d, c.Host(), len(b))
	}

	second.Close()
	second.Close() // a second Close counts once
	if fs := f.Fills(); len(fs) != 1 || fs[0].Waiters != 1 {
		t.Errorf("after one waiter closed: %+v, want 1 waiter", fs)
	}

	// The reader still streams through WriteTo (the sendfile path).
	if _, ok := first.Reader.(io.WriterTo); !ok {
		t.Error("a waiter's reader lost WriteTo")
	}
	close(release)
	var sb strings.Builder
	if _, err := first.Reader.(io.WriterTo).WriteTo(&sb); err != nil {
		t.Fatal(err)
	}
	first.Close()
	if got := digest.FromString(string(b[:1024]) + sb.String()); got != d {
		t.Errorf("the blob read through WriteTo has digest %s, want %s", got, d)
	}
	waitUntil(t, "the fill to leave the list", func() bool { return len(f.Fills()) == 0 })
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; i < 1000 && time.Now().Before(deadline); i++ {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}
