package mirror

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/opencontainers/go-digest"
)

// TestBadInputTable sends hostile and malformed requests, each with the
// status and OCI code the distribution spec gives, and checks that none
// reaches the upstream unless it should, and that a listening socket named
// by the requests (as ?ns=) sees no connection at all.
func TestBadInputTable(t *testing.T) {
	e := newPushEnv(t, "local")
	img, _ := random.Image(1024, 1)
	if err := crane.Push(img, e.up.host+"/team/app:v1"); err != nil {
		t.Fatal(err)
	}
	readImage(t, e.host+"/team/app:v1") // team/app is now a proxied name

	var trapConns atomic.Int32
	trap, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer trap.Close()
	go func() {
		for {
			c, err := trap.Accept()
			if err != nil {
				return
			}
			trapConns.Add(1)
			c.Close()
		}
	}()
	trapHost := trap.Addr().String()

	// An upload of local/a, to be touched through another repository.
	loc, err := startUpload(e.srv.URL, "local/a")
	if err != nil {
		t.Fatal(err)
	}
	uploadID := loc[strings.LastIndex(loc, "/")+1:]
	if i := strings.IndexByte(uploadID, '?'); i >= 0 {
		uploadID = uploadID[:i]
	}

	d := "sha256:" + strings.Repeat("a", 64)
	body := []byte("hello")
	bd := digest.FromBytes(body)
	long := strings.Repeat("a", 256)
	cases := []struct {
		method, path string
		body         []byte
		header       http.Header
		status       int
		code         string // "" for HEAD
		upstream     bool   // may reach the upstream
	}{
		// Names.
		{"GET", "/v2/Team/app/manifests/v1", nil, nil, 400, "NAME_INVALID", false},
		{"GET", "/v2/team/../app/manifests/v1", nil, nil, 400, "NAME_INVALID", false},
		{"GET", "/v2/team/%2e%2e/app/manifests/v1", nil, nil, 400, "NAME_INVALID", false},
		{"GET", "/v2/./app/manifests/v1", nil, nil, 400, "NAME_INVALID", false},
		{"GET", "/v2/team//app/manifests/v1", nil, nil, 400, "NAME_INVALID", false},
		{"GET", "/v2/-team/manifests/v1", nil, nil, 400, "NAME_INVALID", false},
		{"GET", "/v2/team-/manifests/v1", nil, nil, 400, "NAME_INVALID", false},
		{"GET", "/v2/a___b/manifests/v1", nil, nil, 400, "NAME_INVALID", false},
		{"GET", "/v2/" + long + "/manifests/v1", nil, nil, 400, "NAME_INVALID", false},
		{"GET", "/v2/" + strings.Repeat("ab/", 90) + "c/manifests/v1", nil, nil, 400, "NAME_INVALID", false},
		{"GET", "/v2/t%C3%A9am/manifests/v1", nil, nil, 400, "NAME_INVALID", false},
		{"GET", "/v2/team%00/manifests/v1", nil, nil, 400, "NAME_INVALID", false},
		{"GET", "/v2/team%20app/manifests/v1", nil, nil, 400, "NAME_INVALID", false},
		{"GET", "/v2/team%2F..%2Fapp/manifests/v1", nil, nil, 400, "NAME_INVALID", false},
		{"GET", "/v2/" + trapHost + "/x/manifests/v1", nil, nil, 400, "NAME_INVALID", false},
		// Tags and references.
		{"GET", "/v2/team/app/manifests/bad!tag", nil, nil, 400, "TAG_INVALID", false},
		{"GET", "/v2/team/app/manifests/.tag", nil, nil, 400, "TAG_INVALID", false},
		{"GET", "/v2/team/app/manifests/-tag", nil, nil, 400, "TAG_INVALID", false},
		{"GET", "/v2/team/app/manifests/" + strings.Repeat("t", 129), nil, nil, 400, "TAG_INVALID", false},
		{"GET", "/v2/team/app/manifests/v1%0d%0aSet-Cookie:%20x", nil, nil, 400, "DIGEST_INVALID", false},
		{"GET", "/v2/team/app/manifests/v1%0d%0aX-Injected%20y", nil, nil, 400, "TAG_INVALID", false},
		{"GET", "/v2/team/app/manifests/v1%0aX", nil, nil, 400, "TAG_INVALID", false},
		{"GET", "/v2/team/app/manifests/a:b", nil, nil, 400, "DIGEST_INVALID", false},
		// Digests.
		{"GET", "/v2/team/app/blobs/sha256:abc", nil, nil, 400, "DIGEST_INVALID", false},
		{"GET", "/v2/team/app/blobs/sha256:" + strings.Repeat("A", 64), nil, nil, 400, "DIGEST_INVALID", false},
		{"GET", "/v2/team/app/blobs/sha256:" + strings.Repeat("g", 64), nil, nil, 400, "DIGEST_INVALID", false},
		{"GET", "/v2/team/app/blobs/sha256:", nil, nil, 400, "DIGEST_INVALID", false},
		{"GET", "/v2/team/app/blobs/sha512:" + strings.Repeat("a", 64), nil, nil, 400, "DIGEST_INVALID", false},
		{"GET", "/v2/team/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", nil, nil, 400, "DIGEST_INVALID", false},
		{"GET", "/v2/team/app/blobs/sha384:" + strings.Repeat("a", 96), nil, nil, 400, "DIGEST_INVALID", false},
		{"GET", "/v2/team/app/blobs/foo:bar", nil, nil, 400, "DIGEST_INVALID", false},
		{"GET", "/v2/team/app/blobs/sha256%3A..%2F..%2Fetc%2Fpasswd", nil, nil, 404, "NOT_FOUND", false},
		{"GET", "/v2/team/app/blobs/../../etc/passwd", nil, nil, 404, "NOT_FOUND", false},
		{"GET", "/v2/team/app/referrers/sha256:xyz", nil, nil, 400, "DIGEST_INVALID", false},
		// Routes and methods.
		{"GET", "/v2/team/app/nothing/here", nil, nil, 404, "NOT_FOUND", false},
		{"GET", "/v2/team/app/manifests", nil, nil, 404, "NOT_FOUND", false},
		{"GET", "/v3/", nil, nil, 404, "NOT_FOUND", false},
		{"GET", "/index.html", nil, nil, 404, "NOT_FOUND", false}, // "/" is the status page
		{"GET", "/_slipway/ui/", nil, nil, 404, "NOT_FOUND", false},
		{"POST", "/v2/team/app/manifests/v1", nil, nil, 405, "UNSUPPORTED", false},
		{"PATCH", "/v2/team/app/blobs/" + d, nil, nil, 405, "UNSUPPORTED", false},
		{"PUT", "/v2/local/a/tags/list", nil, nil, 405, "UNSUPPORTED", false},
		{"HEAD", "/v2/team/app/manifests/bad!tag", nil, nil, 400, "", false},
		// ns naming hosts that are not configured upstreams: never contacted.
		{"GET", "/v2/team/app/manifests/v1?ns=" + trapHost, nil, nil, 404, "NAME_UNKNOWN", false},
		{"GET", "/v2/team/app/blobs/" + d + "?ns=" + trapHost, nil, nil, 404, "NAME_UNKNOWN", false},
		{"GET", "/v2/team/app/manifests/v1?ns=127.0.0.1", nil, nil, 404, "NAME_UNKNOWN", false},
		{"GET", "/v2/team/app/manifests/v1?ns=localhost", nil, nil, 404, "NAME_UNKNOWN", false},
		{"GET", "/v2/team/app/manifests/v1?ns=169.254.169.254", nil, nil, 404, "NAME_UNKNOWN", false},
		{"GET", "/v2/team/app/manifests/v1?ns=metadata.google.internal", nil, nil, 404, "NAME_UNKNOWN", false},
		{"GET", "/v2/team/app/manifests/v1?ns=%5B::1%5D", nil, nil, 404, "NAME_UNKNOWN", false},
		{"GET", "/v2/team/app/manifests/v1?ns=10.0.0.1", nil, nil, 404, "NAME_UNKNOWN", false},
		{"GET", "/v2/team/app/manifests/v1?ns=evil.example.com", nil, nil, 404, "NAME_UNKNOWN", false},
		{"HEAD", "/v2/team/app/manifests/v1?ns=" + trapHost, nil, nil, 404, "", false},
		// Writes to proxied names.
		{"POST", "/v2/team/app/blobs/uploads/", nil, nil, 403, "DENIED", false},
		{"POST", "/v2/upstream/team/app/blobs/uploads/", nil, nil, 403, "DENIED", false},
		{"POST", "/v2/local/a/blobs/uploads/?ns=upstream", nil, nil, 403, "DENIED", false},
		{"PUT", "/v2/team/app/manifests/v2", []byte(`{}`), nil, 403, "DENIED", false},
		{"DELETE", "/v2/team/app/manifests/v1", nil, nil, 403, "DENIED", false},
		{"POST", "/v2/elsewhere/x/blobs/uploads/", nil, nil, 403, "DENIED", false},
		// Uploads.
		{"POST", "/v2/local/a/blobs/uploads/?digest=" + string(digest.FromString("other")), body, nil, 400, "DIGEST_INVALID", false},
		{"POST", "/v2/local/a/blobs/uploads/?digest=sha256:nothex", body, nil, 400, "DIGEST_INVALID", false},
		{"PATCH", "/v2/local/a/blobs/uploads/nosuchupload", body, nil, 404, "BLOB_UPLOAD_UNKNOWN", false},
		{"PUT", "/v2/local/a/blobs/uploads/nosuchupload?digest=" + string(bd), body, nil, 404, "BLOB_UPLOAD_UNKNOWN", false},
		{"GET", "/v2/local/a/blobs/uploads/nosuchupload", nil, nil, 404, "BLOB_UPLOAD_UNKNOWN", false},
		{"GET", "/v2/local/a/blobs/uploads/bad..id", nil, nil, 404, "BLOB_UPLOAD_UNKNOWN", false},
		{"GET", "/v2/local/b/blobs/uploads/" + uploadID, nil, nil, 404, "BLOB_UPLOAD_UNKNOWN", false},
		{"PATCH", "/v2/local/b/blobs/uploads/" + uploadID, body, nil, 404, "BLOB_UPLOAD_UNKNOWN", false},
		{"DELETE", "/v2/local/b/blobs/uploads/" + uploadID, nil, nil, 404, "BLOB_UPLOAD_UNKNOWN", false},
		{"PATCH", "/v2/local/a/blobs/uploads/" + uploadID, body, http.Header{"Content-Range": {"10-14"}}, 416, "BLOB_UPLOAD_INVALID", false},
		{"PATCH", "/v2/local/a/blobs/uploads/" + uploadID, body, http.Header{"Content-Range": {"0-9223372036854775807"}}, 416, "BLOB_UPLOAD_INVALID", false},
		{"PATCH", "/v2/local/a/blobs/uploads/" + uploadID, body, http.Header{"Content-Range": {"abc"}}, 400, "BLOB_UPLOAD_INVALID", false},
		{"PUT", "/v2/local/a/blobs/uploads/" + uploadID + "?digest=" + d, body, nil, 400, "DIGEST_INVALID", false},
		// Manifests pushed to a local name.
		{"PUT", "/v2/local/a/manifests/v1", []byte(`{not json`), http.Header{"Content-Type": {"application/vnd.oci.image.manifest.v1+json"}}, 400, "MANIFEST_INVALID", false},
		{"PUT", "/v2/local/a/manifests/v1", []byte(`{"schemaVersion":2,"config":{"digest":"` + d + `","size":1},"layers":[]}`), http.Header{"Content-Type": {"application/vnd.oci.image.manifest.v1+json"}}, 400, "MANIFEST_BLOB_UNKNOWN", false},
		{"PUT", "/v2/local/a/manifests/v1", bytes.Repeat([]byte(" "), 4<<20+1), http.Header{"Content-Type": {"application/vnd.oci.image.manifest.v1+json"}}, 413, "SIZE_INVALID", false},
		{"PUT", "/v2/local/a/manifests/" + d, []byte(`{"schemaVersion":2}`), http.Header{"Content-Type": {"application/vnd.oci.image.index.v1+json"}}, 400, "DIGEST_INVALID", false},
		// Reads that may legitimately ask the upstream.
		{"GET", "/v2/team/app/manifests/missing", nil, nil, 404, "MANIFEST_UNKNOWN", true},
		{"GET", "/v2/team/app/blobs/sha512:" + strings.Repeat("ab", 64), nil, nil, 404, "BLOB_UNKNOWN", true},
		{"GET", "/v2/team/app/manifests/v1?unknown=param&ns=", nil, nil, 200, "", true},
	}
	if len(cases) < 60 {
		t.Fatalf("only %d cases", len(cases))
	}
	for _, c := range cases {
		t.Run(c.method+" "+c.path[:min(len(c.path), 80)], func(t *testing.T) {
			before := e.up.total()
			resp := send(t, c.method, e.url(c.path), c.body, c.header)
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != c.status {
				t.Errorf("status %d, want %d (body %.200s)", resp.StatusCode, c.status, b)
			}
			if c.code != "" {
				var eb struct {
					Errors []struct{ Code, Message string }
				}
				if err := json.Unmarshal(b, &eb); err != nil || len(eb.Errors) == 0 || eb.Errors[0].Code != c.code {
					t.Errorf("body %.200s, want code %s", b, c.code)
				}
			}
			if c.method == "HEAD" && len(b) != 0 {
				t.Error("HEAD with a body")
			}
			if !c.upstream && e.up.total() != before {
				t.Errorf("the upstream got %d requests", e.up.total()-before)
			}
			for k, v := range resp.Header {
				if strings.EqualFold(k, "Set-Cookie") || strings.ContainsAny(strings.Join(v, ""), "\r\n") {
					t.Errorf("injected header %s: %q", k, v)
				}
			}
		})
	}
	if n := trapConns.Load(); n != 0 {
		t.Errorf("a host named in requests got %d connections", n)
	}
	// Nothing was stored by the failed writes.
	if ok, _ := e.store.Linked("", "local/b", bd); ok {
		t.Error("a failed upload left a link")
	}
}

// TestRawBadRequests sends what a well-behaved client cannot: a negative
// Content-Length, a body longer than declared, a huge header.
func TestRawBadRequests(t *testing.T) {
	e := newPushEnv(t, "local")
	raw := func(req string) string {
		c, err := net.DialTimeout("tcp", e.host, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, req)
		line, _ := bufio.NewReader(c).ReadString('\n')
		return line
	}
	host := "Host: " + e.host + "\r\n"
	if got := raw("PATCH /v2/local/a/blobs/uploads/x HTTP/1.1\r\n" + host + "Content-Length: -5\r\n\r\n"); !strings.Contains(got, " 400 ") {
		t.Errorf("negative Content-Length: %q", got)
	}
	if got := raw("POST /v2/local/a/blobs/uploads/ HTTP/1.1\r\n" + host + "Content-Length: 99999999999999999999\r\n\r\n"); !strings.Contains(got, " 400 ") {
		t.Errorf("absurd Content-Length: %q", got)
	}
	// A body longer than declared: only the declared bytes are the upload,
	// so the digest check fails and nothing is stored.
	b := []byte("hello")
	d := digest.FromBytes(b)
	got := raw(fmt.Sprintf("POST /v2/local/a/blobs/uploads/?digest=%s HTTP/1.1\r\n%sContent-Length: 3\r\nConnection: close\r\n\r\nhello", d, host))
	if !strings.Contains(got, " 400 ") {
		t.Errorf("body longer than declared: %q", got)
	}
	if _, err := e.store.StatBlob(d); err == nil {
		t.Error("a truncated upload was stored")
	}
	if got := raw("GET /v2/ HTTP/1.1\r\n" + host + "X-Big: " + strings.Repeat("a", 2<<20) + "\r\n\r\n"); !strings.Contains(got, " 431 ") {
		t.Errorf("huge header: %q", got)
	}
}
