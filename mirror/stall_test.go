package mirror

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"slipway/cache"
	"slipway/upstream"
)

// stallWindow is how long the test server lets a request body take.
const stallWindow = 200 * time.Millisecond

// stallFront serves h as cmd/slipway's --body-stall-timeout does once a
// body stalls: the connection's read deadline passes, so the handler's
// next read of the body fails with an error wrapping os.ErrDeadlineExceeded.
// It returns the server's host:port.
func stallFront(t *testing.T, h http.Handler) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Body != nil && r.Body != http.NoBody {
			if err := http.NewResponseController(w).SetReadDeadline(time.Now().Add(stallWindow)); err != nil {
				t.Errorf("SetReadDeadline: %v", err)
			}
		}
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// rawPartial sends head (a request line and headers, no blank line) and
// then part of the body it declares, and reads the answer. halfClose:
// the client then closes its side, as one that went away does; otherwise
// it just stops sending.
func rawPartial(t *testing.T, addr, head string, partial []byte, halfClose bool) (*http.Response, []byte) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, head+"Host: "+addr+"\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(partial); err != nil {
		t.Fatal(err)
	}
	if halfClose {
		c.(*net.TCPConn).CloseWrite()
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no answer to a partial body: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, b
}

func checkOCIError(t *testing.T, resp *http.Response, body []byte, status int, code string) {
	t.Helper()
	var eb struct {
		Errors []struct{ Code, Message string }
	}
	if resp.StatusCode != status {
		t.Errorf("status %d, want %d (body %s)", resp.StatusCode, status, body)
	}
	if err := json.Unmarshal(body, &eb); err != nil || len(eb.Errors) != 1 {
		t.Fatalf("not an OCI error body: %q", body)
	}
	if eb.Errors[0].Code != code || eb.Errors[0].Message == "" {
		t.Errorf("code %q (%q), want %q", eb.Errors[0].Code, eb.Errors[0].Message, code)
	}
}

// TestStalledRequestBody: a push whose body stalls (or whose client goes
// away mid-body) is answered with a client error in an OCI body, never a
// 500; nothing is stored, an upload keeps the bytes it had, and the push
// can resume and finish.
func TestStalledRequestBody(t *testing.T) {
	b := randomBytes(t, 64<<10)
	d := digest.FromBytes(b)
	const first = 1000 // bytes of b the upload holds before the bad request
	manifest := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"` +
		string(d) + `","size":65536},"layers":[]}`)
	cases := []struct {
		name      string
		head      func(loc string) string // loc: the upload's path and query
		body      []byte                  // declared; only part of it is sent
		halfClose bool
		status    int
		code      string
	}{
		{"PATCH chunk stalls", func(loc string) string {
			return fmt.Sprintf("PATCH %s HTTP/1.1\r\nContent-Type: application/octet-stream\r\nContent-Range: %d-%d\r\nContent-Length: %d\r\n",
				loc, first, len(b)-1, len(b)-first)
		}, b[first:], false, http.StatusRequestTimeout, "BLOB_UPLOAD_INVALID"},
		{"PATCH chunked encoding stalls", func(loc string) string {
			return "PATCH " + loc + " HTTP/1.1\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n"
		}, append([]byte(fmt.Sprintf("%x\r\n", len(b)-first)), b[first:]...), false, http.StatusRequestTimeout, "BLOB_UPLOAD_INVALID"},
		{"PUT last chunk stalls", func(loc string) string {
			return fmt.Sprintf("PUT %s HTTP/1.1\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n",
				withDigest(loc, d), len(b)-first)
		}, b[first:], false, http.StatusRequestTimeout, "BLOB_UPLOAD_INVALID"},
		{"single POST stalls", func(string) string {
			return fmt.Sprintf("POST /v2/local/app/blobs/uploads/?digest=%s HTTP/1.1\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n", d, len(b))
		}, b, false, http.StatusRequestTimeout, "BLOB_UPLOAD_INVALID"},
		{"manifest PUT stalls", func(string) string {
			return fmt.Sprintf("PUT /v2/local/app/manifests/v1 HTTP/1.1\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: %d\r\n", len(manifest))
		}, manifest, false, http.StatusRequestTimeout, "MANIFEST_INVALID"},
		{"PATCH client goes away", func(loc string) string {
			return fmt.Sprintf("PATCH %s HTTP/1.1\r\nContent-Type: application/octet-stream\r\nContent-Range: %d-%d\r\nContent-Length: %d\r\n",
				loc, first, len(b)-1, len(b)-first)
		}, b[first:], true, http.StatusBadRequest, "BLOB_UPLOAD_INVALID"},
		{"single POST client goes away", func(string) string {
			return fmt.Sprintf("POST /v2/local/app/blobs/uploads/?digest=%s HTTP/1.1\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n", d, len(b))
		}, b, true, http.StatusBadRequest, "BLOB_UPLOAD_INVALID"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newPushEnv(t, "local")
			addr := stallFront(t, e.srv.Config.Handler)
			// An upload that already holds the first bytes.
			loc, err := startUpload(e.srv.URL, "local/app")
			if err != nil {
				t.Fatal(err)
			}
			resp := send(t, http.MethodPatch, loc, b[:first], http.Header{"Content-Range": {fmt.Sprintf("0-%d", first-1)}})
			if err := want(resp, http.StatusAccepted); err != nil {
				t.Fatal(err)
			}
			loc = resp.Header.Get("Location")

			start := time.Now()
			resp, body := rawPartial(t, addr, tc.head(loc), tc.body[:len(tc.body)/3], tc.halfClose)
			checkOCIError(t, resp, body, tc.status, tc.code)
			if el := time.Since(start); el > 5*time.Second {
				t.Errorf("answered after %s", el)
			}

			if _, err := e.store.StatBlob(d); !errors.Is(err, cache.ErrNotFound) {
				t.Errorf("blob stored after a broken body: %v", err)
			}
			if r := do(t, http.MethodGet, e.url("/v2/local/app/manifests/v1"), nil); r.StatusCode != http.StatusNotFound {
				t.Errorf("manifest after a broken body: status %d", r.StatusCode)
			}
			// The upload is as it was: it resumes where it stood.
			st := do(t, http.MethodGet, e.url(loc), nil)
			if st.StatusCode != http.StatusNoContent || st.Header.Get("Range") != fmt.Sprintf("0-%d", first-1) {
				t.Fatalf("upload after a broken body: %d, Range %q", st.StatusCode, st.Header.Get("Range"))
			}
			resp = send(t, http.MethodPatch, e.url(loc), b[first:], http.Header{"Content-Range": {fmt.Sprintf("%d-%d", first, len(b)-1)}})
			if err := want(resp, http.StatusAccepted); err != nil {
				t.Fatal(err)
			}
			u, _ := url.Parse(resp.Header.Get("Location"))
			if err := want(send(t, http.MethodPut, withDigest(e.url(u.String()), d), nil, nil), http.StatusCreated); err != nil {
				t.Fatal(err)
			}
			if err := getAndVerify(e.url("/v2/local/app/blobs/"+string(d)), d, int64(len(b)), nil); err != nil {
				t.Fatalf("blob after resuming: %v", err)
			}
		})
	}
}

// Body read errors map to client errors; the same failures met talking to
// an upstream (classified there) still say the upstream is unavailable.
func TestBodyErrorMapping(t *testing.T) {
	deadline := &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}
	reset := &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)}
	for _, c := range []struct {
		err    error
		kind   routeKind
		status int
		code   string
	}{
		{fmt.Errorf("request body brought less than 4096 bytes in 1m0s: %w", deadline), routeUpload, http.StatusRequestTimeout, "BLOB_UPLOAD_INVALID"},
		{deadline, routeManifest, http.StatusRequestTimeout, "MANIFEST_INVALID"},
		{io.ErrUnexpectedEOF, routeUpload, http.StatusBadRequest, "BLOB_UPLOAD_INVALID"},
		{reset, routeUpload, http.StatusBadRequest, "BLOB_UPLOAD_INVALID"},
		{&http.MaxBytesError{Limit: 10}, routeManifest, http.StatusRequestEntityTooLarge, "SIZE_INVALID"},
		{fmt.Errorf("%w: %v", upstream.ErrUnavailable, io.ErrUnexpectedEOF), routeBlob, http.StatusServiceUnavailable, "UNAVAILABLE"},
		{errors.New("something else"), routeUpload, http.StatusInternalServerError, "UNKNOWN"},
	} {
		oe := toOCI(c.err, c.kind)
		if oe.code.status != c.status || oe.code.name != c.code {
			t.Errorf("%v: %d %s, want %d %s", c.err, oe.code.status, oe.code.name, c.status, c.code)
		}
	}
}
