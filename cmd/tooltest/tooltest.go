// Package tooltest finds or builds the pinned programs slipway's tests run
// beside it (MinIO, promtool): separate processes, never imported. .ci/run
// builds the same versions into the same cache and names them in
// environment variables; a test on a machine without them builds them
// once, under a file lock, with go install.
package tooltest

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Tool is a Go program the tests run, pinned to one version.
type Tool struct {
	Name    string // the binary's name: "minio"
	Package string // what go install takes, without the version
	Version string
	Dir     string // its directory under ~/.cache/slipway-tools: "minio-7aac2a2c5b7c"
	Env     string // the variable that names a binary to use instead: "SLIPWAY_MINIO"
	Build   string // how long a build takes, for the log: "about 2 to 4 minutes"

	once sync.Once
	bin  string
	err  string
}

// Binary finds the tool: $Env, else the one .ci/run caches
// (~/.cache/slipway-tools/<Dir>/<Name>), else it builds it there. In CI
// (CI set) a tool that cannot be had fails the test; elsewhere a build
// that cannot run (no network for the module proxy) skips it, saying why.
func (tl *Tool) Binary(t testing.TB) string {
	t.Helper()
	if p := os.Getenv(tl.Env); p != "" {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("%s: %v", tl.Env, err)
		}
		return p
	}
	tl.once.Do(func() { tl.bin, tl.err = tl.build(t) })
	if tl.err != "" {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s %s: %s", tl.Name, tl.Version, tl.err)
		}
		t.Skipf("%s %s is not available and cannot be built here: %s", tl.Name, tl.Version, tl.err)
	}
	return tl.bin
}

// build go-installs the tool unless it is there; it returns its path and
// what went wrong, or "".
func (tl *Tool) build(t testing.TB) (string, string) {
	home, err := os.UserCacheDir()
	if err != nil {
		return "", err.Error()
	}
	dir := filepath.Join(home, "slipway-tools", tl.Dir)
	bin := filepath.Join(dir, tl.Name)
	if _, err := os.Stat(bin); err == nil {
		return bin, ""
	}
	// Test binaries of several packages may get here at once: one builds,
	// the others wait for it on the lock and then find it.
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err.Error()
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err.Error()
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", err.Error()
	}
	if _, err := os.Stat(bin); err == nil {
		return bin, ""
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		return "", "no go command to build it with: " + err.Error()
	}
	t.Logf("building %s %s into %s (go install; %s)", tl.Name, tl.Version, dir, tl.Build)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goBin, "install", tl.Package+"@"+tl.Version)
	cmd.Env = append(os.Environ(), "GOBIN="+dir, "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", "go install: " + err.Error() + "\n" + string(out)
	}
	return bin, ""
}
