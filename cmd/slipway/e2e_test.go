package main

// Helpers for the end-to-end tests in main_test.go: building the binary,
// running it as a subprocess, a fake upstream, and pulling through slipway.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
)

// binPath is the slipway binary TestMain built.
var binPath string

// buildBinary builds ./ (cmd/slipway) into dir. When the tests run with
// -race, so does the binary: a data race in the server then makes it exit
// 66, which the shutdown test sees.
func buildBinary(dir string) error {
	goBin, err := exec.LookPath("go") // go test puts GOROOT/bin first on PATH
	if err != nil {
		goBin = filepath.Join(os.Getenv("GOROOT"), "bin", "go")
	}
	binPath = filepath.Join(dir, "slipway")
	args := []string{"build", "-buildvcs=false", "-o", binPath}
	if raceEnabled() {
		args = append(args, "-race")
	}
	cmd := exec.Command(goBin, append(args, ".")...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	return cmd.Run()
}

func raceEnabled() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

// cleanEnv is this process's environment without any SLIPWAY_ variable,
// plus extra.
func cleanEnv(extra []string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "SLIPWAY_") {
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

// freeAddr returns a 127.0.0.1 address with a port nobody listened on a
// moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// fakeUpstream is a registry in this process that slipway proxies.
type fakeUpstream struct {
	srv  *httptest.Server
	host string // 127.0.0.1:port
	url  string // http://127.0.0.1:port
}

func newUpstream(t *testing.T, opts ...registry.Option) *fakeUpstream {
	t.Helper()
	srv := httptest.NewServer(registry.New(append([]registry.Option{registry.Logger(log.New(io.Discard, "", 0))}, opts...)...))
	t.Cleanup(srv.Close)
	return &fakeUpstream{srv: srv, host: strings.TrimPrefix(srv.URL, "http://"), url: srv.URL}
}

// push puts a random image of layers layers of size bytes each at
// repo:tag, and returns its digest.
func (u *fakeUpstream) push(t *testing.T, ref string, size, layers int64) string {
	t.Helper()
	img, err := random.Image(size, layers)
	if err != nil {
		t.Fatal(err)
	}
	if err := crane.Push(img, u.host+"/"+ref, crane.Insecure); err != nil {
		t.Fatalf("push %s to the upstream: %v", ref, err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// pullAndCheck pulls ref through the mirror at addr, reads every layer to
// the end (which verifies each against its digest), and checks that the
// image digest is the upstream's.
func pullAndCheck(t *testing.T, addr, ref, want string) v1.Image {
	t.Helper()
	img, err := crane.Pull(addr+"/"+ref, crane.Insecure)
	if err != nil {
		t.Fatalf("pull %s through slipway: %v", ref, err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if d.String() != want {
		t.Fatalf("pull %s: digest %s, want the upstream's %s", ref, d, want)
	}
	if _, err := img.RawConfigFile(); err != nil {
		t.Fatalf("pull %s: config: %v", ref, err)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for i, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			t.Fatalf("pull %s: layer %d: %v", ref, i, err)
		}
		_, err = io.Copy(io.Discard, rc)
		rc.Close()
		if err != nil {
			t.Fatalf("pull %s: read layer %d: %v", ref, i, err)
		}
	}
	return img
}

// proc is a running subprocess.
type proc struct {
	cmd    *exec.Cmd
	stderr *syncBuffer
	done   chan struct{} // closed when it exited
	err    error         // Wait's result, set before done is closed
}

// start runs the slipway binary with args and extra environment.
func start(t *testing.T, env []string, args ...string) *proc {
	t.Helper()
	return startCmd(t, env, binPath, args...)
}

// startCmd runs name (slipway, or a command that runs it) with args and
// extra environment. It is killed, with its process group, when the test
// ends.
func startCmd(t *testing.T, env []string, name string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = cleanEnv(env)
	cmd.Dir = t.TempDir()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	p := &proc{cmd: cmd, stderr: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.stderr, p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			select {
			case <-p.done:
			case <-time.After(10 * time.Second):
				t.Errorf("pid %d still running 10 s after SIGKILL", cmd.Process.Pid)
			}
		}
		if t.Failed() {
			t.Logf("output of %s:\n%s", filepath.Base(name), p.stderr.String())
		}
	})
	return p
}

// waitReady polls GET http://addr/v2/ until it answers 200 with the API
// version header: at most 10 s, or until the process exits.
func (p *proc) waitReady(t *testing.T, addr string) {
	t.Helper()
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(10 * time.Second)
	var last string
	for i := 0; i < 200 && time.Now().Before(deadline); i++ {
		select {
		case <-p.done:
			t.Fatalf("slipway exited before it was ready (%v):\n%s", p.err, p.stderr.String())
		default:
		}
		resp, err := client.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && resp.Header.Get("Docker-Distribution-API-Version") == "registry/2.0" {
				return
			}
			last = fmt.Sprintf("status %d, Docker-Distribution-API-Version %q", resp.StatusCode, resp.Header.Get("Docker-Distribution-API-Version"))
		} else {
			last = err.Error()
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("GET http://%s/v2/ not ready within 10 s: %s", addr, last)
}

// stop sends sig to the process and waits up to within for it to exit 0.
func (p *proc) stop(t *testing.T, sig syscall.Signal, within time.Duration) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v: %v", sig, err)
	}
	p.waitExit(t, sig.String(), within)
}

// stopTraced sends SIGTERM to the only child of the process (slipway
// running under strace), and waits up to within for both to exit 0.
func (p *proc) stopTraced(t *testing.T, within time.Duration) {
	t.Helper()
	kids := childrenOf(p.cmd.Process.Pid)
	if len(kids) != 1 {
		t.Fatalf("pid %d has children %v, want exactly one (slipway)", p.cmd.Process.Pid, kids)
	}
	if err := syscall.Kill(kids[0], syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM to slipway (pid %d): %v", kids[0], err)
	}
	p.waitExit(t, "SIGTERM", within)
}

// childrenOf lists the child processes of pid, from
// /proc/<pid>/task/<pid>/children, or where the kernel lacks that file, from
// the parent pid field of every /proc/<n>/stat.
func childrenOf(pid int) []int {
	var kids []int
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid)); err == nil {
		for _, f := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(f); err == nil {
				kids = append(kids, n)
			}
		}
		return kids
	}
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, st := range stats {
		b, err := os.ReadFile(st)
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...; comm may hold spaces and parentheses.
		i := strings.LastIndexByte(string(b), ')')
		f := strings.Fields(string(b)[i+1:])
		if i < 0 || len(f) < 2 || f[1] != strconv.Itoa(pid) {
			continue
		}
		if n, err := strconv.Atoi(filepath.Base(filepath.Dir(st))); err == nil {
			kids = append(kids, n)
		}
	}
	return kids
}

func (p *proc) waitExit(t *testing.T, what string, within time.Duration) {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(within):
		t.Fatalf("still running %s after %s", within, what)
	}
	if p.err != nil {
		var ee *exec.ExitError
		if errors.As(p.err, &ee) {
			t.Fatalf("exit code %d after %s, want 0:\n%s", ee.ExitCode(), what, p.stderr.String())
		}
		t.Fatalf("after %s: %v", what, p.err)
	}
}

// syncBuffer is a bytes.Buffer that the process's output goroutines and the
// test may use at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
