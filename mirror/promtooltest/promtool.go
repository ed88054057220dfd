// Package promtooltest finds or builds Prometheus's promtool for tests of
// the dashboard and rules slipway prints: a separate program, run, never
// imported (Prometheus's module would bring hundreds of dependencies).
package promtooltest

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

// Version is the Prometheus module version whose cmd/promtool the tests
// run (.ci/run builds the same one). Prometheus's Go module versions are
// v0.3xx.y for its 3.xx.y releases.
const Version = "v0.316.0"

var (
	buildOnce sync.Once
	buildErr  string
)

// Binary finds promtool: $SLIPWAY_PROMTOOL, else the one .ci/run caches
// (~/.cache/slipway-tools/promtool-<version>/promtool), else it builds it
// there with go install (minutes: about 9 on 2 busy cores). In CI (CI set)
// a promtool that cannot be had fails the test; elsewhere, a build that
// cannot run (no network for the module proxy) skips it, saying why.
func Binary(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("SLIPWAY_PROMTOOL"); p != "" {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("SLIPWAY_PROMTOOL: %v", err)
		}
		return p
	}
	home, err := os.UserCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(home, "slipway-tools", "promtool-"+Version)
	bin := filepath.Join(dir, "promtool")
	buildOnce.Do(func() { buildErr = build(t, dir, bin) })
	if buildErr != "" {
		if os.Getenv("CI") != "" {
			t.Fatalf("promtool %s: %s", Version, buildErr)
		}
		t.Skipf("promtool %s is not available and cannot be built here: %s", Version, buildErr)
	}
	return bin
}

// build go-installs promtool into dir unless bin is there; it returns what
// went wrong, or "".
func build(t testing.TB, dir, bin string) string {
	if _, err := os.Stat(bin); err == nil {
		return ""
	}
	// Test binaries of several packages may get here at once: one builds,
	// the others wait for it on the lock and then find it.
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err.Error()
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return err.Error()
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return err.Error()
	}
	if _, err := os.Stat(bin); err == nil {
		return ""
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		return "no go command to build it with: " + err.Error()
	}
	t.Logf("building promtool %s into %s (go install; minutes)", Version, dir)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goBin, "install", "github.com/prometheus/prometheus/cmd/promtool@"+Version)
	cmd.Env = append(os.Environ(), "GOBIN="+dir, "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "go install: " + err.Error() + "\n" + string(out)
	}
	return ""
}
