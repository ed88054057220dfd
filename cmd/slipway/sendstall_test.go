package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"testing"
	"time"
)

// A client that asks for a blob and never reads it is dropped after
// --send-stall-timeout instead of holding its connection and goroutine;
// a slow client that keeps reading gets the whole blob.
func TestSendStall(t *testing.T) {
	const window = time.Second
	up := newUpstream(t)
	big := seedImage(t, up, "team/big", 16<<20, 1)
	small := seedImage(t, up, "team/small", 2<<20, 1)
	addr := freeAddr(t)
	p := start(t, nil, "serve", "--listen", addr, "--upstream", up.url, "--data-dir", t.TempDir(),
		"--log-level", "warn", "--send-stall-timeout", window.String())
	p.waitReady(t, addr)
	bigLayer, smallLayer := layerOf(t, big), layerOf(t, small)
	for _, b := range []struct{ repo, digest string }{{big.repo, bigLayer}, {small.repo, smallLayer}} {
		if got, n, err := rawGet(addr, "/v2/"+b.repo+"/blobs/"+b.digest, 0, 0); err != nil || got != b.digest {
			t.Fatalf("warming %s: %d bytes, digest %s, %v", b.digest, n, got, err)
		}
	}
	base := waitGoroutines(t, addr, 0, 0)

	t.Run("stops reading", func(t *testing.T) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.(*net.TCPConn).SetReadBuffer(16 << 10)
		fmt.Fprintf(c, "GET /v2/%s/blobs/%s HTTP/1.1\r\nHost: %s\r\n\r\n", big.repo, bigLayer, addr)
		time.Sleep(window + 3*time.Second) // no reading at all
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := io.Copy(io.Discard, c)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("the server still holds the connection %s after the client stopped reading (%d bytes so far)", window+3*time.Second, n)
		}
		if n >= 16<<20 {
			t.Fatalf("all %d bytes arrived: the socket buffers took the blob, the test proves nothing", n)
		}
		t.Logf("dropped after %d of %d bytes (%v)", n, 16<<20, err)
		waitGoroutines(t, addr, base, 10*time.Second)
	})

	t.Run("idle keep-alive connection", func(t *testing.T) {
		// A connection that waited longer than the window after a full
		// response still gets net/http's own answer to its next request.
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		br := bufio.NewReader(c)
		fmt.Fprintf(c, "GET /v2/ HTTP/1.1\r\nHost: %s\r\n\r\n", addr)
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("first request: %v", err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		time.Sleep(window + time.Second)
		fmt.Fprintf(c, "GET /v2/ HTTP/1.1\r\nHost: %s\r\nno colon here\r\n\r\n", addr)
		resp, err = http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("a malformed request after %s idle got no answer: %v", window+time.Second, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("malformed request: status %d, want 400", resp.StatusCode)
		}
	})

	t.Run("slow but reading", func(t *testing.T) {
		// 64 KiB every 50 ms: about 1.3 MB/s, well above 256 KiB a window.
		got, n, err := rawGet(addr, "/v2/"+small.repo+"/blobs/"+smallLayer, 64<<10, 50*time.Millisecond)
		if err != nil || got != smallLayer {
			t.Fatalf("slow reader: %d bytes, digest %s, %v", n, got, err)
		}
	})
}

// rawGet GETs path over its own connection, reading piece bytes every
// pause (all at once if piece is 0), and returns the body's digest.
func rawGet(addr, path string, piece int, pause time.Duration) (string, int64, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return "", 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if piece > 0 {
		c.(*net.TCPConn).SetReadBuffer(piece)
	}
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", path, addr)
	resp, err := http.ReadResponse(bufio.NewReaderSize(c, 4096), nil)
	if err != nil {
		return "", 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", 0, fmt.Errorf("status %d", resp.StatusCode)
	}
	h := sha256.New()
	var n int64
	if piece == 0 {
		n, err = io.Copy(h, resp.Body)
	} else {
		for i := 0; i < 1<<16; i++ {
			m, cerr := io.CopyN(h, resp.Body, int64(piece))
			n += m
			if cerr != nil {
				if cerr != io.EOF {
					err = cerr
				}
				break
			}
			time.Sleep(pause)
		}
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), n, err
}

func layerOf(t *testing.T, img loadImage) string {
	t.Helper()
	var m struct{ Layers []struct{ Digest string } }
	if err := json.Unmarshal(img.manifest, &m); err != nil || len(m.Layers) != 1 {
		t.Fatalf("manifest: %v", err)
	}
	return m.Layers[0].Digest
}

// sendGuard moves the write deadline before whatever reaches the socket,
// however long the handler took before it wrote: a handler slower than the
// window still answers a client that reads, through Write, ReadFrom and
// Flush; a client that stops reading is still dropped.
func TestSendGuardMovesTheDeadlineAtEachWrite(t *testing.T) {
	const window = 300 * time.Millisecond
	body := bytes.Repeat([]byte("x"), 1<<20)
	failed := make(chan error, 4)
	h := sendGuard(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(2 * window) // longer than the window, before any write
		var err error
		switch r.URL.Path {
		case "/write":
			w.WriteHeader(http.StatusOK)
			if err = http.NewResponseController(w).Flush(); err == nil {
				time.Sleep(2 * window)
				_, err = w.Write(body)
			}
		case "/readfrom":
			_, err = io.Copy(w, struct{ io.Reader }{bytes.NewReader(body)})
			if err == nil {
				_, err = w.(io.ReaderFrom).ReadFrom(bytes.NewReader(body))
			}
		case "/endless":
			for err == nil {
				_, err = w.Write(body)
			}
		}
		failed <- err
	}), window)
	srv := httptest.NewServer(h)
	defer srv.Close()
	for _, path := range []string{"/write", "/readfrom"} {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || n < int64(len(body)) {
			t.Errorf("%s: %d bytes, %v", path, n, err)
		}
		if err := <-failed; err != nil {
			t.Errorf("%s: the handler's write failed: %v", path, err)
		}
	}

	c, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.(*net.TCPConn).SetReadBuffer(16 << 10)
	fmt.Fprintf(c, "GET /endless HTTP/1.1\r\nHost: x\r\n\r\n") // and never read
	select {
	case err := <-failed:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("the write to a client that stopped reading ended with %v", err)
		}
	case <-time.After(2*window + 10*time.Second):
		t.Fatal("a client that stopped reading still holds its handler")
	}
}
