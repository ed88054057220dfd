package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// trickle yields p in pieces of step bytes, every every.
type trickle struct {
	p     []byte
	step  int
	every time.Duration
	sent  chan struct{} // closed after the first piece
	once  sync.Once
}

func (r *trickle) Read(b []byte) (int, error) {
	if len(r.p) == 0 {
		return 0, io.EOF
	}
	n := copy(b[:min(len(b), r.step)], r.p)
	r.p = r.p[n:]
	r.once.Do(func() { close(r.sent) })
	time.Sleep(r.every)
	return n, nil
}

// Item 4 of issue 12: concurrent pushes of one declared digest all get
// their 201 when the first writer is slower than --body-stall-timeout:
// the others read their own bodies meanwhile, so the stall guard never
// cuts them off.
func TestConcurrentPushesOutlastASlowFirstWriter(t *testing.T) {
	up := newUpstream(t)
	addr := freeAddr(t)
	p := start(t, nil, "serve", "--listen", addr, "--upstream", up.url, "--data-dir", t.TempDir(), "--body-stall-timeout", "1s")
	p.waitReady(t, addr)
	base := "http://" + addr
	blob := make([]byte, 96<<10)
	rand.Read(blob)
	d := digest.FromBytes(blob)

	upload := func(body io.Reader) error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, "POST", base+"/v2/ci/app/blobs/uploads/", nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusAccepted {
			return fmt.Errorf("POST: %d", resp.StatusCode)
		}
		loc := resp.Header.Get("Location")
		sep := "?"
		if strings.Contains(loc, "?") {
			sep = "&"
		}
		req, _ = http.NewRequestWithContext(ctx, "PUT", base+loc+sep+"digest="+string(d), body)
		req.ContentLength = int64(len(blob))
		req.Header.Set("Content-Type", "application/octet-stream")
		resp, err = http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusCreated {
			return fmt.Errorf("PUT: %d %s", resp.StatusCode, b)
		}
		return nil
	}
	// The first writer sends 8 KiB every 250 ms: it never stalls, and it
	// takes 3 s, three windows of the stall guard.
	slow := &trickle{p: blob, step: 8 << 10, every: 250 * time.Millisecond, sent: make(chan struct{})}
	slowErr := make(chan error, 1)
	go func() { slowErr <- upload(slow) }()
	<-slow.sent
	time.Sleep(300 * time.Millisecond) // it is the writer now
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = upload(bytes.NewReader(blob))
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("push %d beside a slow first writer: %v", i, err)
		}
	}
	if err := <-slowErr; err != nil {
		t.Errorf("the slow push: %v", err)
	}
	resp, err := http.Get(base + "/v2/ci/app/blobs/" + string(d))
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !bytes.Equal(got, blob) {
		t.Fatalf("read back %d bytes (status %d), want the pushed blob", len(got), resp.StatusCode)
	}
}
