package cache

import (
	"bytes"
	"errors"
	"io"
	"runtime"
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

// leaderThenOthers starts a first push through g, waits until it is half
// way, then starts n pushes of good bytes.
func leaderThenOthers(t *testing.T, s *Store, blob []byte, g *gate, n int) (leader chan error, rest []chan error) {
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
	return leader, rest
}

func awaitAll(t *testing.T, what string, cs []chan error) {
	t.Helper()
	for i, c := range cs {
		select {
		case err := <-c:
			if err != nil {
				t.Errorf("%s %d: %v", what, i, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s %d has not ended after 10 s", what, i)
		}
	}
}

// A push whose body breaks half way leaves the half it wrote to the
// others: they compare it, append the rest, and one of them commits.
// Nothing is written twice.
func TestWriteDeclaredWriterFailsOthersStore(t *testing.T) {
	s, written := countWrites(t)
	blob := testBytes(1<<20, 7)
	d := digest.FromBytes(blob)
	g := &gate{p: blob, half: make(chan struct{}), release: make(chan struct{}), fail: errors.New("client went away")}
	leader, rest := leaderThenOthers(t, s, blob, g, 4)
	awaitAll(t, "push beside a broken one", rest)
	close(g.release)
	if err := <-leader; err == nil {
		t.Error("the push whose body broke succeeded")
	}
	if got := written.Load(); got != int64(len(blob)) {
		t.Errorf("wrote %d bytes, want the blob's %d once", got, len(blob))
	}
	checkStored(t, s, d, blob, OriginPushed)
}

// Issue 12, item 4: a push that stalls half way holds nobody up. Every
// push reads its own body at its own pace, so no client's body stalls
// while another's is slow (a stall guard would cut it off).
func TestWriteDeclaredStalledWriterDoesNotHoldOthers(t *testing.T) {
	s, written := countWrites(t)
	blob := testBytes(1<<20, 7)
	d := digest.FromBytes(blob)
	g := &gate{p: blob, half: make(chan struct{}), release: make(chan struct{})}
	leader, rest := leaderThenOthers(t, s, blob, g, 3)
	awaitAll(t, "push behind a stalled one", rest)
	checkStored(t, s, d, blob, OriginPushed)
	if got := written.Load(); got != int64(len(blob)) {
		t.Errorf("wrote %d bytes, want the blob's %d once", got, len(blob))
	}
	close(g.release)
	if err := <-leader; err == nil {
		t.Error("the stalled push, cut short, succeeded")
	}
}

// A push with wrong bytes ahead of the others: they find their bytes
// differ from the shared file's, go on alone from the prefix they agreed
// on, and store the right blob; the wrong push gets ErrDigestMismatch.
func TestWriteDeclaredWrongBytesAheadOfGoodOnes(t *testing.T) {
	s, _ := countWrites(t)
	blob := testBytes(1<<20, 7)
	d := digest.FromBytes(blob)
	wrong := bytes.Clone(blob)
	wrong[len(wrong)/4] ^= 0xff // differs in the half the wrong push sends first
	g := &gate{p: wrong, half: make(chan struct{}), release: make(chan struct{})}
	leader, rest := leaderThenOthers(t, s, blob, g, 4)
	awaitAll(t, "good push beside a wrong one", rest)
	checkStored(t, s, d, blob, OriginPushed)
	close(g.release)
	if err := <-leader; err == nil {
		t.Error("the wrong push succeeded")
	}
	// And once more after it: a fresh push of the blob only hashes.
	if err := s.WriteDeclared(d, bytes.NewReader(blob), int64(len(blob)), OriginPushed); err != nil {
		t.Fatal(err)
	}
	assertTmpEmpty(t, s.Dir())
}

// Many pushes of one digest with every kind of body at once, under -race:
// the good ones all succeed, the bad ones all fail, one blob is stored, and
// no temp file is left.
func TestWriteDeclaredMixedBodiesConcurrently(t *testing.T) {
	s, _ := countWrites(t)
	blob := testBytes(2<<20, 9)
	d := digest.FromBytes(blob)
	bad := bytes.Clone(blob)
	bad[len(bad)-1] ^= 1
	bodies := []struct {
		b    []byte
		size int64
		ok   bool
	}{
		{blob, int64(len(blob)), true}, {bad, int64(len(bad)), false}, {blob[:len(blob)/2], int64(len(blob)), false},
		{append(bytes.Clone(blob), 'x'), -1, false}, {blob, -1, true},
	}
	var wg sync.WaitGroup
	errs := make([]error, 25)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b := bodies[i%len(bodies)]
			errs[i] = s.WriteDeclared(d, &slowReader{b: b.b, step: 8<<10 + i*1000}, b.size, OriginPushed)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if ok := bodies[i%len(bodies)].ok; ok != (err == nil) {
			t.Errorf("push %d (good %v): %v", i, ok, err)
		}
	}
	checkStored(t, s, d, blob, OriginPushed)
	assertTmpEmpty(t, s.Dir())
}

// slowReader yields b in steps of step bytes, yielding the processor in
// between, so that concurrent pushes interleave.
type slowReader struct {
	b    []byte
	step int
}

func (r *slowReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), r.step)], r.b)
	r.b = r.b[n:]
	runtime.Gosched()
	return n, nil
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
