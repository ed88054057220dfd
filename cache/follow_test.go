package cache

import (
	"bytes"
	"context"
	"io"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// Followers hear of new bytes once per stretch of followBatch, not once per
// write: a fill arrives in small network reads, and waking 32 waiters for
// each one is most of what a cold fill costs the server besides sending.
// A follower's Read returns what is visible when it wakes, so a follower
// woken per write needs about a Read per write when it keeps up.
func TestFollowersWakeOncePerStretchNotPerWrite(t *testing.T) {
	// Here followers are told only of whole stretches (and of the first
	// bytes and the end), never of bytes that waited.
	linger := followLinger
	followLinger = time.Hour
	t.Cleanup(func() { followLinger = linger })

	s, _ := newStore(t)
	data := testBytes(4<<20, 40)
	w, err := s.NewBlobWriter("")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Cancel()

	const followers = 4
	type got struct {
		b     []byte
		reads int
		err   error
	}
	results := make(chan got, followers)
	for range followers {
		r := follow(t, w, context.Background())
		go func() {
			var g got
			p := make([]byte, len(data))
			for {
				n, err := r.Read(p)
				g.b = append(g.b, p[:n]...)
				g.reads++
				if err != nil {
					if err != io.EOF {
						g.err = err
					}
					results <- g
					return
				}
			}
		}()
	}
	const piece = 4 << 10
	for off := 0; off < len(data); off += piece {
		writeAll(t, w, data[off:off+piece], piece)
		time.Sleep(20 * time.Microsecond) // time for followers to keep up
	}
	if err := w.Commit(digest.FromBytes(data), int64(len(data)), OriginPulled); err != nil {
		t.Fatal(err)
	}
	// The first bytes, one Read per stretch, the last byte, io.EOF.
	most := 1 + len(data)/followBatch + 1 + 1
	for range followers {
		select {
		case g := <-results:
			if g.err != nil || !bytes.Equal(g.b, data) {
				t.Fatalf("follower: %d bytes, %v", len(g.b), g.err)
			}
			if g.reads > most {
				t.Errorf("a follower of %d writes read %d times, want at most %d: it was woken per write", len(data)/piece, g.reads, most)
			}
		case <-time.After(waitLong):
			t.Fatal("followers did not finish")
		}
	}
}

// The bytes of a writer that pauses reach its followers within
// followLinger, however few: a slow upstream's bytes flow as they come.
func TestFollowGetsTheBytesOfAPausedWriter(t *testing.T) {
	s, _ := newStore(t)
	data := testBytes(1000, 41)
	w, err := s.NewBlobWriter("")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Cancel()
	r := follow(t, w, context.Background())

	writeAll(t, w, data[:2], 2)
	if res := await(t, readAsync(r, 100), "first bytes"); res.err != nil || !bytes.Equal(res.b, data[:1]) {
		t.Fatalf("first Read = %q, %v; want the first byte at once", res.b, res.err)
	}
	pending := readAsync(r, 2000)
	writeAll(t, w, data[2:], 998) // far less than a stretch, then nothing
	if res := await(t, pending, "bytes of a paused writer"); res.err != nil || !bytes.Equal(res.b, data[1:len(data)-1]) {
		t.Fatalf("Read = %d bytes, %v; want the %d bytes visible", len(res.b), res.err, len(data)-2)
	}
}
