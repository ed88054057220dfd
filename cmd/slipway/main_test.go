package main

// End-to-end tests of the slipway binary: TestMain builds it once, and each
// test runs it as a subprocess against an in-process upstream registry
// (go-containerregistry's pkg/registry), pulling through it with crane.
// Everything talks to 127.0.0.1 only. The helpers live in e2e_test.go.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	if bin := os.Getenv(testBinEnv); bin != "" {
		// This binary, run again by a test of its own inside namespaces
		// (docker_test.go): the outer run built slipway already.
		binPath = bin
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "slipway-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
	code := 1
	if err := buildBinary(dir); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: build slipway:", err)
	} else {
		code = m.Run()
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

// The flag contract: --listen, --upstream and --data-dir start a mirror that
// answers /v2/ and serves the upstream's images.
func TestServeFlags(t *testing.T) {
	t.Parallel()
	up := newUpstream(t)
	want := up.push(t, "team/app:v1", 1024, 2)
	addr, dir := freeAddr(t), t.TempDir()

	p := start(t, nil, "serve", "--listen", addr, "--upstream", up.url, "--data-dir", dir)
	p.waitReady(t, addr)
	pullAndCheck(t, addr, "team/app:v1", want)

	// The cache is laid out as the README says: blobs/sha256/<ab>/<hex>.
	// A fill commits just after its client got the last byte: give the
	// last one a moment.
	if n := waitFiles(t, filepath.Join(dir, "blobs", "sha256", "??", strings.Repeat("?", 64)), 3); n < 3 {
		t.Errorf("blobs in %s: %d files, want 3 (config and two layers)", dir, n)
	}
	if _, err := os.Stat(filepath.Join(dir, "index")); err != nil {
		t.Errorf("index directory: %v", err)
	}
}

// Every flag has an environment twin that works without any flag.
func TestServeEnv(t *testing.T) {
	t.Parallel()
	up := newUpstream(t)
	want := up.push(t, "team/app:v1", 1024, 2)
	addr, dir := freeAddr(t), t.TempDir()

	p := start(t, []string{
		"SLIPWAY_LISTEN=" + addr,
		"SLIPWAY_UPSTREAM=" + up.url,
		"SLIPWAY_DATA_DIR=" + dir,
		"SLIPWAY_LOG_FORMAT=json",
	}, "serve")
	p.waitReady(t, addr)
	pullAndCheck(t, addr, "team/app:v1", want)

	if waitFiles(t, filepath.Join(dir, "blobs", "sha256", "*", "*"), 3) == 0 {
		t.Errorf("SLIPWAY_DATA_DIR=%s holds no blobs after a pull", dir)
	}
	// SLIPWAY_LOG_FORMAT=json: every log line is a JSON object.
	first, _, _ := strings.Cut(p.stderr.String(), "\n")
	var line map[string]any
	if err := json.Unmarshal([]byte(first), &line); err != nil {
		t.Errorf("SLIPWAY_LOG_FORMAT=json: first log line %q is not JSON: %v", first, err)
	}
}

// A flag on the command line wins over its environment twin.
func TestServeFlagBeatsEnv(t *testing.T) {
	t.Parallel()
	up := newUpstream(t)
	want := up.push(t, "team/app:v1", 1024, 1)
	envAddr, flagAddr := freeAddr(t), freeAddr(t)
	envDir, flagDir := filepath.Join(t.TempDir(), "env"), t.TempDir()

	p := start(t, []string{
		"SLIPWAY_LISTEN=" + envAddr,
		"SLIPWAY_UPSTREAM=http://" + freeAddr(t), // nothing listens there
		"SLIPWAY_DATA_DIR=" + envDir,
	}, "serve", "--listen", flagAddr, "--upstream", up.url, "--data-dir", flagDir)
	p.waitReady(t, flagAddr)
	pullAndCheck(t, flagAddr, "team/app:v1", want) // proves --upstream won

	if resp, err := http.Get("http://" + envAddr + "/v2/"); err == nil {
		resp.Body.Close()
		t.Errorf("SLIPWAY_LISTEN=%s answered although --listen=%s was given", envAddr, flagAddr)
	}
	if _, err := os.Stat(envDir); err == nil {
		t.Errorf("SLIPWAY_DATA_DIR=%s was created although --data-dir was given", envDir)
	}
	if waitFiles(t, filepath.Join(flagDir, "blobs", "sha256", "*", "*"), 2) == 0 {
		t.Errorf("--data-dir=%s holds no blobs after a pull", flagDir)
	}
}

// Commands that end at once: their exit codes and what they print.
func TestCommandLine(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name       string
		env        []string
		args       []string
		code       int
		stdout     string // a substring stdout must contain
		stderr     string // a substring stderr must contain
		emptyStdio bool   // stdout must be empty
	}{
		{name: "no args", args: nil, code: 2, stderr: "Usage:", emptyStdio: true},
		{name: "version", args: []string{"version"}, code: 0, stdout: "slipway"},
		{name: "--version", args: []string{"--version"}, code: 0, stdout: "slipway"},
		{name: "help", args: []string{"help"}, code: 0, stdout: "slipway serve"},
		{name: "unknown command", args: []string{"frobnicate"}, code: 2, stderr: `unknown command "frobnicate"`, emptyStdio: true},
		{name: "unknown flag", args: []string{"serve", "--no-such-flag"}, code: 2, stderr: "no-such-flag", emptyStdio: true},
		{name: "stray argument", args: []string{"serve", "extra"}, code: 2, stderr: "unexpected arguments", emptyStdio: true},
		{name: "bad duration flag", args: []string{"serve", "--tag-ttl", "soon"}, code: 2, stderr: "tag-ttl", emptyStdio: true},
		{name: "bad env twin", env: []string{"SLIPWAY_TAG_TTL=soon"}, args: []string{"serve"}, code: 2, stderr: "SLIPWAY_TAG_TTL", emptyStdio: true},
		{name: "bad log format", args: []string{"serve", "--log-format", "xml"}, code: 2, stderr: "log format", emptyStdio: true},
		{name: "bad log level", args: []string{"serve", "--log-level", "loud"}, code: 2, stderr: "log level", emptyStdio: true},
		{name: "bad upstream", args: []string{"serve", "--upstream", "ftp://example", "--data-dir", "DATADIR", "--listen", "127.0.0.1:0"}, code: 1, stderr: "invalid URL"},
		{name: "serve -h", args: []string{"serve", "-h"}, code: 0, stderr: "-fill-idle-timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			args := slices.Clone(tc.args)
			for i, a := range args {
				if a == "DATADIR" {
					args[i] = t.TempDir()
				}
			}
			code, stdout, stderr := runOnce(t, tc.env, args...)
			if code != tc.code {
				t.Errorf("slipway %s: exit %d, want %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, tc.code, stdout, stderr)
			}
			if !strings.Contains(stdout, tc.stdout) {
				t.Errorf("slipway %s: stdout %q does not contain %q", strings.Join(args, " "), stdout, tc.stdout)
			}
			if !strings.Contains(stderr, tc.stderr) {
				t.Errorf("slipway %s: stderr %q does not contain %q", strings.Join(args, " "), stderr, tc.stderr)
			}
			if tc.emptyStdio && stdout != "" {
				t.Errorf("slipway %s: stdout %q, want nothing", strings.Join(args, " "), stdout)
			}
		})
	}
}

// The README's flags table lists exactly the flags `slipway serve` has.
func TestReadmeFlags(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	var documented []string
	for _, m := range regexp.MustCompile("(?m)^\\| `--([a-z-]+)").FindAllStringSubmatch(string(readme), -1) {
		documented = append(documented, m[1])
	}
	_, _, help := runOnce(t, nil, "serve", "-h")
	var actual []string
	for _, m := range regexp.MustCompile(`(?m)^  -([a-z-]+)`).FindAllStringSubmatch(help, -1) {
		actual = append(actual, m[1])
	}
	slices.Sort(documented)
	slices.Sort(actual)
	if len(actual) == 0 || !slices.Equal(documented, actual) {
		t.Errorf("README documents flags %v; slipway serve -h has %v", documented, actual)
	}
	for _, f := range actual {
		env := "SLIPWAY_" + strings.ToUpper(strings.ReplaceAll(f, "-", "_"))
		if !strings.Contains(string(readme), env) {
			t.Errorf("README does not mention %s, the twin of --%s", env, f)
		}
	}
}

// SIGTERM shuts down cleanly (exit 0), and what was cached survives: a
// restart on the same data directory serves the image with the upstream gone.
func TestSIGTERMAndRestartOffline(t *testing.T) {
	t.Parallel()
	up := newUpstream(t)
	want := up.push(t, "team/app:v1", 64<<10, 2)
	addr, dir := freeAddr(t), t.TempDir()
	args := []string{"serve", "--listen", addr, "--upstream", up.url, "--data-dir", dir, "--tag-ttl", "1h"}

	p := start(t, nil, args...)
	p.waitReady(t, addr)
	pullAndCheck(t, addr, "team/app:v1", want)
	p.stop(t, syscall.SIGTERM, 10*time.Second)
	if !strings.Contains(p.stderr.String(), "shutting down") {
		t.Errorf("no shutdown log line after SIGTERM:\n%s", p.stderr.String())
	}

	up.srv.Close() // everything must come from the cache now
	if resp, err := http.Get(up.url + "/v2/"); err == nil {
		resp.Body.Close()
		t.Fatal("the upstream still answers after Close")
	}
	addr = freeAddr(t)
	args[2] = addr
	p = start(t, nil, args...)
	p.waitReady(t, addr)
	pullAndCheck(t, addr, "team/app:v1", want)
	// By digest too: a manifest by digest is never asked of the upstream.
	pullAndCheck(t, addr, "team/app@"+want, want)
	p.stop(t, syscall.SIGTERM, 10*time.Second)
}

// A cache hit goes out through sendfile(2) (STYLE "Shapes" 6): run the binary
// under strace and count the bytes that sendfile moved for a 4 MiB blob.
func TestCacheHitUsesSendfile(t *testing.T) {
	t.Parallel()
	strace, err := exec.LookPath("strace")
	if err != nil {
		if os.Getenv("CI") == "" {
			t.Skip("strace is not installed (CI installs it; apt-get install strace)")
		}
		t.Fatal("strace is not on PATH; .ci/run installs it")
	}
	up := newUpstream(t)
	want := up.push(t, "team/big:v1", 4<<20, 1)
	addr, dir := freeAddr(t), t.TempDir()
	trace := filepath.Join(t.TempDir(), "strace.out")

	p := startCmd(t, nil, strace, "-f", "-e", "trace=sendfile", "-o", trace,
		binPath, "serve", "--listen", addr, "--upstream", up.url, "--data-dir", dir)
	p.waitReady(t, addr)
	if s := p.stderr.String(); strings.Contains(s, "Operation not permitted") {
		t.Fatalf("strace cannot trace here (ptrace not permitted):\n%s", s)
	}
	img := pullAndCheck(t, addr, "team/big:v1", want) // a miss: fills the cache
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	ld, err := layers[0].Digest()
	if err != nil {
		t.Fatal(err)
	}
	size, err := layers[0].Size()
	if err != nil {
		t.Fatal(err)
	}
	if size < 4<<20 {
		t.Fatalf("layer is %d bytes, want at least 4 MiB", size)
	}

	// Now a hit. The fill commits (fsync, rename, index) just after the
	// client got its last byte, so wait for the blob to be served from its
	// file: only then does the answer say it is immutable.
	hit := false
	for i := 0; i < 50 && !hit; i++ {
		resp, err := http.Get("http://" + addr + "/v2/team/big/blobs/" + ld.String())
		if err != nil {
			t.Fatal(err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK || n != size {
			t.Fatalf("GET blob: status %d, %d bytes, err %v; want 200 and %d bytes", resp.StatusCode, n, err, size)
		}
		if hit = strings.Contains(resp.Header.Get("Cache-Control"), "immutable"); !hit {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if !hit {
		t.Fatal("the blob was not served from the cache within 5 s of its pull")
	}

	// Stop slipway (strace's child) with SIGTERM; strace then exits and has
	// flushed its output.
	p.stopTraced(t, 10*time.Second)
	out, err := os.ReadFile(trace)
	if err != nil {
		t.Fatal(err)
	}
	var sent int64
	re := regexp.MustCompile(`sendfile.*= ([0-9]+)`)
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		if m := re.FindStringSubmatch(sc.Text()); m != nil {
			v, _ := strconv.ParseInt(m[1], 10, 64)
			sent += v
		}
	}
	// Both answers go out with sendfile: the miss, streamed from the
	// growing temp file, and the hit. net/http may write the first 512
	// bytes of each itself.
	if sent < 2*(size-512) {
		t.Errorf("sendfile moved %d bytes in all, want at least twice the blob's %d less 512 (miss and hit); strace output:\n%s", sent, size, tail(string(out), 40))
	}
}

// waitFiles waits up to 5 s for pattern to match want files, and returns
// how many it matches.
func waitFiles(t *testing.T, pattern string, want int) int {
	t.Helper()
	var n int
	for i := 0; i < 50; i++ {
		m, err := filepath.Glob(pattern)
		if err != nil {
			t.Fatal(err)
		}
		if n = len(m); n >= want {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	return n
}

func tail(s string, lines int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}

// runOnce runs slipway to completion (at most 10 s) and returns its exit code
// and output.
func runOnce(t *testing.T, env []string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, binPath, args...)
	cmd.Env = cleanEnv(env)
	cmd.Dir = t.TempDir() // --data-dir defaults to ./slipway-data: keep it out of the tree
	var o, e strings.Builder
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("slipway %s did not exit within 10 s", strings.Join(args, " "))
	}
	if err != nil {
		if _, ok := err.(*exec.ExitError); !ok {
			t.Fatalf("slipway %s: %v", strings.Join(args, " "), err)
		}
	}
	return cmd.ProcessState.ExitCode(), o.String(), e.String()
}
