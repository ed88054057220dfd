// Package tiertest starts a real MinIO server for tests of the shared
// tier: a separate process, on loopback, in a temp directory. MinIO is
// AGPL; it is a test server only, run as a program and never imported.
package tiertest

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"slipway/cmd/tooltest"
)

// Version is the MinIO module version the tests run (.ci/run builds it).
const Version = "v0.0.0-20260212201848-7aac2a2c5b7c"

// Server is a running MinIO.
type Server struct {
	Endpoint             string // http://127.0.0.1:port
	AccessKey, SecretKey string
	dir                  string
	addr                 string
	cmd                  *exec.Cmd
	done                 chan struct{}
}

// MinIO is the pinned MinIO the tests run.
var MinIO = &tooltest.Tool{Name: "minio", Package: "github.com/minio/minio", Version: Version,
	Dir: "minio-" + Version[len(Version)-12:], Env: "SLIPWAY_MINIO", Build: "about 2 to 4 minutes, 1.5 GB of memory"}

// Binary finds or builds MinIO (see tooltest.Tool.Binary).
func Binary(t testing.TB) string { return MinIO.Binary(t) }

// Start runs MinIO on a free loopback port with a fresh data directory;
// it is stopped when the test ends.
func Start(t testing.TB) *Server {
	t.Helper()
	s := &Server{dir: t.TempDir(), AccessKey: "slipway", SecretKey: randomHex(16)}
	s.addr = freeAddr(t)
	s.Endpoint = "http://" + s.addr
	s.Restart(t)
	t.Cleanup(func() { s.Stop(t) })
	return s
}

// Restart starts MinIO again on the same address and data (after Stop).
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	console := freeAddr(t)
	cmd := exec.Command(Binary(t), "server", s.dir, "--address", s.addr, "--console-address", console, "--quiet")
	cmd.Env = append(os.Environ(), "MINIO_ROOT_USER="+s.AccessKey, "MINIO_ROOT_PASSWORD="+s.SecretKey,
		"MINIO_BROWSER=off", "MINIO_UPDATE=off", "MINIO_CI_CD=on")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.cmd, s.done = cmd, make(chan struct{})
	go func() { cmd.Wait(); close(s.done) }()
	// Ready is when the S3 API answers: /minio/health/ready says 200 a
	// moment before its object layer is up (S3 calls get 503
	// XMinioServerNotInitialized then, seen on a loaded machine). An
	// anonymous ListBuckets answers 403 once it is.
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get(s.Endpoint + "/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode != http.StatusServiceUnavailable && resp.StatusCode < 500 {
				return
			}
		}
		select {
		case <-s.done:
			t.Fatal("MinIO exited at start")
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatal("MinIO not ready within 30 s")
}

// Stop kills MinIO and waits for it (by its process group).
func (s *Server) Stop(t testing.TB) {
	if s.cmd == nil {
		return
	}
	syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		t.Errorf("MinIO pid %d still running 10 s after SIGKILL", s.cmd.Process.Pid)
	}
	s.cmd = nil
}

func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// String is the server's address, for logs.
func (s *Server) String() string { return fmt.Sprintf("MinIO at %s", s.Endpoint) }
