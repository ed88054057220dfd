package mirror

import (
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/opencontainers/go-digest"

	"slipway/cache"
	"slipway/upstream"
)

// accepts is what the client's Accept header says of manifests: the
// manifest media types it names, each once. A range ("*/*",
// "application/*") stands for every type it covers; anything else (and
// any parameter) is dropped, so nothing of the header reaches the
// upstream but types slipway knows. None: the client takes any.
func accepts(r *http.Request) []string {
	var out []string
	for _, h := range r.Header.Values("Accept") {
		if slices.Contains(upstream.AcceptedTypes, h) {
			// A line that is one known type, as Docker and containerd
			// send them: it covers itself alone.
			if !slices.Contains(out, h) {
				if out == nil {
					out = make([]string, 0, len(upstream.AcceptedTypes))
				}
				out = append(out, h)
			}
			continue
		}
		for h != "" {
			var a string
			a, h, _ = strings.Cut(h, ",")
			mt, ok := upstream.MediaRange(a)
			if !ok {
				continue
			}
			for _, known := range upstream.AcceptedTypes {
				if upstream.Covers(mt, known) && !slices.Contains(out, known) {
					if out == nil {
						out = make([]string, 0, len(upstream.AcceptedTypes))
					}
					out = append(out, known)
				}
			}
		}
	}
	return out
}

// getManifest serves a manifest by tag or digest.
// https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-manifests
func (s *Server) getManifest(c echo.Context, r route) error {
	t, err := s.resolve(c, r)
	if err != nil {
		return err
	}
	if t.local {
		return s.getLocalManifest(c, t.repo, r)
	}
	m, src, err := t.up.Proxy.Manifest(c.Request().Context(), t.repo, r.ref, accepts(c.Request()))
	if err != nil {
		return err
	}
	setSource(c, src)
	return writeManifest(c, m)
}

func writeManifest(c echo.Context, m cache.Manifest) error {
	h := c.Response().Header()
	setDescriptorHeaders(h, m.Digest, int64(len(m.Bytes)), m.MediaType)
	if match := c.Request().Header.Get("If-None-Match"); match != "" && match == etag(m.Digest) {
		return c.NoContent(http.StatusNotModified)
	}
	if c.Request().Method == http.MethodHead {
		return c.NoContent(http.StatusOK)
	}
	return c.Blob(http.StatusOK, m.MediaType, m.Bytes)
}

// setDescriptorHeaders sets the headers that describe content: its media
// type, length, digest and ETag (each only if known). The values share one
// array, as http.Header.Clone makes them: each slice's capacity is its
// length, so an Add to one copies it rather than writing over the next.
func setDescriptorHeaders(h http.Header, d digest.Digest, size int64, mediaType string) {
	vals := make([]string, 0, 4)
	set := func(canonicalKey, v string) {
		vals = append(vals, v)
		h[canonicalKey] = vals[len(vals)-1 : len(vals) : len(vals)]
	}
	if mediaType != "" {
		set("Content-Type", mediaType)
	}
	if size >= 0 {
		set("Content-Length", strconv.FormatInt(size, 10))
	}
	if d != "" {
		set("Docker-Content-Digest", string(d))
		set("Etag", etag(d))
	}
}

func etag(d digest.Digest) string { return `"` + string(d) + `"` }

// headManifest answers whether a manifest exists, with its digest, size and
// media type. It stores nothing it did not have.
func (s *Server) headManifest(c echo.Context, r route) error {
	t, err := s.resolve(c, r)
	if err != nil {
		return err
	}
	if t.local {
		return s.getLocalManifest(c, t.repo, r)
	}
	desc, src, err := t.up.Proxy.HeadManifest(c.Request().Context(), t.repo, r.ref, accepts(c.Request()))
	if err != nil {
		return err
	}
	setSource(c, src)
	setDescriptorHeaders(c.Response().Header(), desc.Digest, desc.Size, desc.MediaType)
	return c.NoContent(http.StatusOK)
}

// getBlob serves a blob: a stored one through http.ServeContent (Range,
// conditional requests, sendfile), an uncached one streamed from the fill
// while it downloads.
// https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-blobs
func (s *Server) getBlob(c echo.Context, r route) error {
	t, err := s.resolve(c, r)
	if err != nil {
		return err
	}
	if t.local {
		return s.getLocalBlob(c, t.repo, r)
	}
	ctx := c.Request().Context()
	b, err := t.up.Proxy.Blob(ctx, t.repo, r.digest)
	if err != nil {
		return err
	}
	setSource(c, b.Source)
	return serveBlob(c, r.digest, b, func() (*upstream.Blob, error) { return t.up.Proxy.Blob(ctx, t.repo, r.digest) })
}

// serveBlob sends b: a stored blob through http.ServeContent, a fill in
// progress as it grows. A request a growing body cannot answer right gets
// the blob once it is verified and stored (again is how to open it then):
// one with a Range, and an HTTP/1.0 one without a length (its body ends
// when the connection closes, so it could not tell a fill cut off on a
// wrong digest from a whole blob).
func serveBlob(c echo.Context, d digest.Digest, b *upstream.Blob, again func() (*upstream.Blob, error)) error {
	defer func() { b.Close() }()
	req := c.Request()
	if b.File == nil && (req.Header.Get("Range") != "" || (b.Size < 0 && !req.ProtoAtLeast(1, 1))) {
		if _, err := io.Copy(io.Discard, b.Reader); err != nil {
			return err
		}
		b.Close()
		var err error
		if b, err = again(); err != nil {
			return err
		}
		if b.File == nil { // evicted at once and filling again
			return newError(codeUnavailable, "the blob is being fetched again; try again")
		}
	}
	if b.File != nil {
		serveBlobFile(c, d, b.File)
		return nil
	}
	return streamBlob(c, d, b.Reader, b.Size)
}

func serveBlobFile(c echo.Context, d digest.Digest, f io.ReadSeeker) {
	h := c.Response().Header()
	h.Set(echo.HeaderContentType, "application/octet-stream")
	h.Set("Docker-Content-Digest", string(d))
	h.Set("ETag", etag(d))
	h.Set("Cache-Control", "max-age=31536000, immutable")
	size, err := f.Seek(0, io.SeekEnd)
	if err == nil {
		_, err = f.Seek(0, io.SeekStart)
	}
	if err != nil {
		panic(http.ErrAbortHandler) // a stored blob that cannot be read: nothing to send
	}
	http.ServeContent(&rangeErrorWriter{sendfileWriter: sendfileWriter{c.Response()}, head: c.Request().Method == http.MethodHead, size: size},
		c.Request(), "", time.Time{}, f)
}

// rangeErrorWriter turns http.ServeContent's plain-text 416 (a Range that
// is garbage, inverted or past the end) into an OCI error body, with the
// Content-Range RFC 9110 asks of a 416.
type rangeErrorWriter struct {
	sendfileWriter
	head    bool
	size    int64
	swallow bool // the 416's own text, not sent
}

func (w *rangeErrorWriter) WriteHeader(status int) {
	if status != http.StatusRequestedRangeNotSatisfiable {
		w.sendfileWriter.WriteHeader(status)
		return
	}
	body := ociBody(codeRangeNotSatisfiable.name, "the requested range is not satisfiable: want bytes=start-end within the blob")
	h := w.Header()
	h.Del("X-Content-Type-Options")
	h.Set("Content-Range", "bytes */"+strconv.FormatInt(w.size, 10))
	h.Set(echo.HeaderContentType, echo.MIMEApplicationJSON)
	if w.head {
		body = nil
	}
	h.Set(echo.HeaderContentLength, strconv.Itoa(len(body)))
	w.sendfileWriter.WriteHeader(status)
	w.sendfileWriter.Write(body)
	w.swallow = true
}

func (w *rangeErrorWriter) Write(p []byte) (int, error) {
	if w.swallow {
		return len(p), nil
	}
	return w.sendfileWriter.Write(p)
}

// streamBlob copies a fill in progress to the client. If the fill fails
// (upstream error, digest mismatch) the connection is cut, so the client
// never sees a complete response with wrong bytes.
func streamBlob(c echo.Context, d digest.Digest, r io.Reader, size int64) error {
	h := c.Response().Header()
	setDescriptorHeaders(h, d, size, "application/octet-stream")
	c.Response().WriteHeader(http.StatusOK)
	// The fill's reader sends each stretch through sendfileWriter.ReadFrom,
	// so bytes leave as they arrive, copied by the kernel.
	_, err := io.Copy(sendfileWriter{c.Response()}, r)
	if err != nil {
		requestOf(c).err = err
		panic(http.ErrAbortHandler)
	}
	return nil
}

// headBlob answers whether a blob exists and its size. An uncached blob is
// asked of the upstream with a HEAD; nothing is stored.
func (s *Server) headBlob(c echo.Context, r route) error {
	t, err := s.resolve(c, r)
	if err != nil {
		return err
	}
	if t.local {
		return s.headLocalBlob(c, t.repo, r)
	}
	desc, src, err := t.up.Proxy.HeadBlob(c.Request().Context(), t.repo, r.digest)
	if err != nil {
		return err
	}
	setSource(c, src)
	setDescriptorHeaders(c.Response().Header(), r.digest, desc.Size, "application/octet-stream")
	return c.NoContent(http.StatusOK)
}

// sendfileWriter is echo's Response with ReadFrom forwarded to the
// underlying http.ResponseWriter: echo.Response has no ReadFrom (echo#2725),
// and without it io.Copy from an *os.File loses sendfile(2).
type sendfileWriter struct{ *echo.Response }

func (w sendfileWriter) ReadFrom(r io.Reader) (int64, error) {
	if !w.Committed {
		w.WriteHeader(http.StatusOK)
	}
	rf, ok := w.Writer.(io.ReaderFrom)
	if !ok {
		return io.Copy(struct{ io.Writer }{w.Response}, r)
	}
	n, err := rf.ReadFrom(r)
	w.Size += n
	return n, err
}
