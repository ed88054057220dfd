package cache

import (
	"bytes"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// countWrites opens a store that counts every byte written to a temp file.
func countWrites(t *testing.T) (*Store, *atomic.Int64) {
	var n atomic.Int64
	s, _ := newStoreOpts(t, Options{WrapWrite: func(w io.Writer) io.Writer { return countingWriter{w, &n} }})
	return s, &n
}

type countingWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n.Add(int64(n))
	return n, err
}

func TestWriteDeclaredConcurrentWritesOnce(t *testing.T) {
	s, written := countWrites(t)
	blob := testBytes(3<<20, 7)
	d := digest.FromBytes(blob)
	var wg sync.WaitGroup
	errs := make([]error, 16)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = s.WriteDeclared(d, bytes.NewReader(blob), int64(len(blob)), OriginPushed)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("push %d: %v", i, err)
		}
	}
	if got := written.Load(); got != int64(len(blob)) {
		t.Errorf("16 pushes of one %d-byte blob wrote %d bytes to disk, want it once", len(blob), got)
	}
	checkStored(t, s, d, blob, OriginPushed)
}

// gate yields the first half of p, then waits for release and fails or
// stalls.
type gate struct {
	p       []byte
	off     int
	half    chan struct{} // closed when the first half is out
	release chan struct{}
	fail    error // after release; nil: block until release, then EOF early
}

func (g *gate) Read(b []byte) (int, error) {
	if g.off >= len(g.p)/2 {
		select {
		case <-g.half:
		default:
			close(g.half)
		}
		<-g.release
		if g.fail != nil {
			return 0, g.fail
		}
		return 0, io.ErrUnexpectedEOF
	}
	n := copy(b, g.p[g.off:len(g.p)/2])
	g.off += n
	return n, nil
}

// leaderThenWaiters starts a first push through g, waits until it is
// half way, then starts n pushes of good bytes and waits until all of them
// wait for the first (or, with wantWait false, just starts them).
func leaderThenWaiters(t *testing.T, s *Store, blob []byte, g *gate, n int, wantWait bool) (leader chan error, rest []chan error) {
	d := digest.FromBytes(blob)
	leader = make(chan error, 1)
	go func() { leader <- s.WriteDeclared(d, g, int64(len(blob)), OriginPushed) }()
	select {
	case <-g.half:
	case <-time.After(10 * time.Second):
		t.Fatal("the first push did not get half way in 10 s")
	}
	for i := 0; i < n; i++ {
		c := make(chan error, 1)
		go func() { c <- s.WriteDeclared(d, bytes.NewReader(blob), int64(len(blob)), OriginPushed) }()
		rest = append(rest, c)
	}
	if wantWait {
		s.declared.mu.Lock()
		e := s.declared.m[d]
		s.declared.mu.Unlock()
		if e == nil {
			t.Fatal("the first push is not registered as the writer")
		}
		deadline := time.Now().Add(10 * time.Second)
		for e.waiters.Load() != int32(n) && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if got := e.waiters.Load(); got != int32(n) {
			t.Fatalf("%d pushes wait for the first, want %d", got, n)
		}
	}
	return leader, rest
}

func TestWriteDeclaredWriterFailsWaitersStore(t *testing.T) {
	s, written := countWrites(t)
	blob := testBytes(1<<20, 7)
	d := digest.FromBytes(blob)
	g := &gate{p: blob, half: make(chan struct{}), release: make(chan struct{}), fail: errors.New("client went away")}
	leader, rest := leaderThenWaiters(t, s, blob, g, 4, true)
	close(g.release)
	if err := <-leader; err == nil {
		t.Error("the push whose body broke succeeded")
	}
	for i, c := range rest {
		if err := <-c; err != nil {
			t.Errorf("waiting push %d: %v", i, err)
		}
	}
	// The broken half, then one whole copy by the waiter that took over.
	if got, want := written.Load(), int64(len(blob)/2+len(blob)); got != want {
		t.Errorf("wrote %d bytes, want %d", got, want)
	}
	checkStored(t, s, d, blob, OriginPushed)
}

func TestWriteDeclaredStalledWriterDoesNotHoldOthers(t *testing.T) {
	old := declaredStall
	declaredStall = 100 * time.Millisecond
	t.Cleanup(func() { declaredStall = old })
	s, _ := countWrites(t)
	blob := testBytes(1<<20, 7)
	d := digest.FromBytes(blob)
	g := &gate{p: blob, half: make(chan struct{}), release: make(chan struct{})}
	leader, rest := leaderThenWaiters(t, s, blob, g, 3, false)
	for i, c := range rest {
		select {
		case err := <-c:
			if err != nil {
				t.Errorf("push %d behind a stalled one: %v", i, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("push %d is still held by a stalled one after 10 s", i)
		}
	}
	checkStored(t, s, d, blob, OriginPushed)
	close(g.release)
	if err := <-leader; err == nil {
		t.Error("the stalled push, cut short, succeeded")
	}
}

func TestWriteDeclaredStoredBlobIsOnlyHashed(t *testing.T) {
	s, written := countWrites(t)
	blob := testBytes(256<<10, 7)
	d := digest.FromBytes(blob)
	if err := s.PutBlob(bytes.NewReader(blob), d, OriginPulled); err != nil {
		t.Fatal(err)
	}
	before := written.Load()
	bad := append([]byte(nil), blob...)
	bad[7] ^= 1
	for _, c := range []struct {
		body []byte
		size int64
		want error
	}{
		{bad, int64(len(bad)), ErrDigestMismatch},
		{blob[:1000], int64(len(blob)), ErrSizeMismatch},
		{blob, int64(len(blob)), nil},
		{blob, -1, nil},
	} {
		if err := s.WriteDeclared(d, bytes.NewReader(c.body), c.size, OriginPushed); !errors.Is(err, c.want) {
			t.Errorf("push of %d bytes, size %d: %v, want %v", len(c.body), c.size, err, c.want)
		}
	}
	if got := written.Load() - before; got != 0 {
		t.Errorf("pushes of a stored blob wrote %d bytes", got)
	}
	// Pushed content is pinned: the pulled blob is now pushed.
	checkStored(t, s, d, blob, OriginPushed)
}

func TestWriteDeclaredBadBytes(t *testing.T) {
	s, _ := countWrites(t)
	blob := testBytes(64<<10, 7)
	d := digest.FromBytes(blob)
	if err := s.WriteDeclared(d, bytes.NewReader(blob[1:]), -1, OriginPushed); !errors.Is(err, ErrDigestMismatch) {
		t.Errorf("wrong bytes: %v", err)
	}
	if err := s.WriteDeclared(d, bytes.NewReader(blob), int64(len(blob))+1, OriginPushed); !errors.Is(err, ErrSizeMismatch) {
		t.Errorf("wrong size: %v", err)
	}
	if err := s.WriteDeclared("sha256:zz", bytes.NewReader(blob), -1, OriginPushed); err == nil {
		t.Error("a malformed digest was accepted")
	}
	if _, err := s.StatBlob(d); !errors.Is(err, ErrNotFound) {
		t.Errorf("after failed pushes the blob is indexed: %v", err)
	}
}

func checkStored(t *testing.T, s *Store, d digest.Digest, want []byte, origin Origin) {
	t.Helper()
	f, info, err := s.OpenBlob(d)
	if err != nil {
		t.Fatalf("OpenBlob: %v", err)
	}
	defer f.Close()
	got, err := io.ReadAll(f)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("stored blob: %d bytes, err %v; want %d bytes", len(got), err, len(want))
	}
	if info.Origin != origin {
		t.Errorf("origin %v, want %v", info.Origin, origin)
	}
}
