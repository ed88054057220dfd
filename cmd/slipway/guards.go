package main

import (
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"time"
)

// minBodyProgress is what a request body must bring in each
// --body-stall-timeout: 4 KiB a minute by default, 68 bytes a second,
// which any real client beats by far.
const minBodyProgress = 4 << 10

// stallGuard cuts off request bodies that trickle. A body must bring
// minBodyProgress bytes within every window (counted from the end of the
// headers, then from each time it did); otherwise its read fails, the
// handler's error answers, and the connection is closed. Unlike a
// ReadTimeout, a long push that keeps moving is never cut. window <= 0: off.
func stallGuard(h http.Handler, window time.Duration) http.Handler {
	if window <= 0 {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Body == nil || r.Body == http.NoBody {
			h.ServeHTTP(w, r)
			return
		}
		b := &stallReader{body: r.Body, rc: http.NewResponseController(w), window: window}
		if b.extend() == nil { // else the connection has no deadlines: serve as is
			r.Body = b
		}
		h.ServeHTTP(w, r)
	})
}

// stallReader is a request body that moves the connection's read deadline
// forward each time minBodyProgress more bytes arrived.
type stallReader struct {
	body   io.ReadCloser
	rc     *http.ResponseController
	window time.Duration
	got    int64 // bytes since the deadline last moved
}

func (s *stallReader) extend() error {
	s.got = 0
	return s.rc.SetReadDeadline(time.Now().Add(s.window))
}

func (s *stallReader) Read(p []byte) (int, error) {
	n, err := s.body.Read(p)
	s.got += int64(n)
	switch {
	case err == io.EOF:
		// The body is complete: no deadline while the handler works on it
		// (net/http reads the connection in the background from now on,
		// and a deadline there would cancel the request).
		s.rc.SetReadDeadline(time.Time{})
	case errors.Is(err, os.ErrDeadlineExceeded):
		err = fmt.Errorf("request body brought less than %d bytes in %s: %w", minBodyProgress, s.window, err)
	case err == nil && s.got >= minBodyProgress:
		s.extend()
	}
	return n, err
}

func (s *stallReader) Close() error { return s.body.Close() }

// sendPiece is what a client must take in of a response in each
// --send-stall-timeout: 256 KiB a minute by default, about 4 KiB a second.
const sendPiece = 256 << 10

// sendGuard drops clients that stop reading. With no WriteTimeout (a big
// pull may take as long as it needs), a client that opens a pull and never
// reads would hold its connection and goroutine for ever. Responses go out
// in pieces of sendPiece bytes, each with a write deadline window away, so
// a slow client that keeps reading is never cut. Blob bodies stay on
// sendfile: each piece is a file section. window <= 0: off.
//
// The deadline moves right before each thing that can reach the socket: a
// piece of the body (Write, ReadFrom), a flush, an informational status,
// and net/http's flush of what is left once the handler returns. A final
// status alone writes nothing (net/http keeps it with the body), and net/http
// clears the deadline after every response, so nothing is set up front: a
// small response costs two deadline moves, not four.
func sendGuard(h http.Handler, window time.Duration) http.Handler {
	if window <= 0 {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := &stallWriter{ResponseWriter: w, rc: *http.NewResponseController(w), window: window}
		h.ServeHTTP(sw, r)
		// net/http flushes the last bytes after the handler returns: give
		// them a window too. Then it clears the deadline itself.
		sw.extend()
	})
}

type stallWriter struct {
	http.ResponseWriter
	rc         http.ResponseController
	window     time.Duration
	noDeadline bool // the connection has no write deadline to move
}

func (s *stallWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

func (s *stallWriter) extend() {
	if !s.noDeadline && s.rc.SetWriteDeadline(time.Now().Add(s.window)) != nil {
		s.noDeadline = true
	}
}

func (s *stallWriter) WriteHeader(code int) {
	if code < 200 {
		s.extend() // net/http writes an informational status at once
	}
	s.ResponseWriter.WriteHeader(code)
}

// FlushError sends what is buffered, within a window. http.ResponseController
// (and so echo's Flush) finds it before it unwraps.
func (s *stallWriter) FlushError() error {
	s.extend()
	return http.NewResponseController(s.ResponseWriter).Flush()
}

func (s *stallWriter) Write(p []byte) (int, error) {
	var n int
	for len(p) > 0 {
		s.extend()
		m, err := s.ResponseWriter.Write(p[:min(len(p), sendPiece)])
		n += m
		if err != nil {
			return n, err
		}
		p = p[m:]
	}
	return n, nil
}

// ReadFrom sends r in pieces through the ResponseWriter's own ReadFrom,
// which uses sendfile(2) when r is a file or a section of one.
func (s *stallWriter) ReadFrom(r io.Reader) (int64, error) {
	rf, ok := s.ResponseWriter.(io.ReaderFrom)
	if !ok {
		return io.CopyBuffer(struct{ io.Writer }{s}, r, make([]byte, 32<<10))
	}
	lr, ok := r.(*io.LimitedReader)
	if !ok {
		lr = &io.LimitedReader{R: r, N: math.MaxInt64}
	}
	var total int64
	for lr.N > 0 {
		s.extend()
		n, err := rf.ReadFrom(&io.LimitedReader{R: lr.R, N: min(lr.N, sendPiece)})
		lr.N -= n
		total += n
		if err != nil || n == 0 {
			return total, err
		}
	}
	return total, nil
}
