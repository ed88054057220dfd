package main

import (
	"bytes"
	"crypto/rand"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/creack/pty"
	"github.com/google/go-containerregistry/pkg/crane"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/opencontainers/go-digest"

	"slipway/cache"
)

// A terminal is what answers the terminal ioctls, not any character
// device: /dev/null is one, and got bars (and their escape codes) before.
func TestBarTerminal(t *testing.T) {
	t.Parallel()
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer devNull.Close()
	if fi, _ := devNull.Stat(); fi.Mode()&os.ModeCharDevice == 0 {
		t.Fatal("/dev/null is not a character device here: this test proves nothing")
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	file, err := os.Create(filepath.Join(t.TempDir(), "log"))
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	for name, out := range map[string]io.Writer{"/dev/null": devNull, "a pipe": w, "a file": file, "a buffer": &bytes.Buffer{}} {
		if barTerminal(out) {
			t.Errorf("%s is taken for a terminal", name)
		}
	}
	ptmx, tty, err := pty.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer ptmx.Close()
	defer tty.Close()
	for _, c := range []struct {
		cols uint16
		want bool
	}{{80, true}, {minBarColumns, true}, {minBarColumns - 1, false}, {0, false}} {
		if err := pty.Setsize(ptmx, &pty.Winsize{Cols: c.cols, Rows: 24}); err != nil {
			t.Fatal(err)
		}
		if got := barTerminal(tty); got != c.want {
			t.Errorf("a terminal %d columns wide: bars %v, want %v", c.cols, got, c.want)
		}
	}
}

// ptyRun is slipway running with its stderr on a pseudo-terminal of a
// given size, its stdout on a pipe.
type ptyRun struct {
	cmd    *exec.Cmd
	screen *syncBuffer // all the terminal got, escape codes and all
	stdout *syncBuffer
	read   chan struct{} // closed when the terminal is drained
	exited chan struct{}
}

func startOnPty(t *testing.T, cols, rows uint16, args ...string) *ptyRun {
	t.Helper()
	ptmx, tty, err := pty.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ptmx.Close() })
	if err := pty.Setsize(ptmx, &pty.Winsize{Cols: cols, Rows: rows}); err != nil {
		t.Fatal(err)
	}
	r := &ptyRun{screen: &syncBuffer{}, stdout: &syncBuffer{}, read: make(chan struct{}), exited: make(chan struct{})}
	r.cmd = exec.Command(binPath, args...)
	r.cmd.Env = cleanEnv(nil)
	r.cmd.Dir = t.TempDir()
	r.cmd.Stdout, r.cmd.Stderr = r.stdout, tty
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	tty.Close() // the child holds it; the reader sees EIO once it exits
	go func() {
		defer close(r.read)
		io.Copy(r.screen, ptmx)
	}()
	go func() {
		defer close(r.exited)
		r.cmd.Wait()
	}()
	t.Cleanup(func() {
		r.cmd.Process.Kill()
		<-r.exited
	})
	return r
}

// wait returns the exit code and everything the terminal got.
func (r *ptyRun) wait(t *testing.T, within time.Duration) (int, string) {
	t.Helper()
	select {
	case <-r.exited:
	case <-time.After(within):
		t.Fatalf("slipway %v did not exit within %s; the terminal got:\n%q", r.cmd.Args[1:], within, r.screen.String())
	}
	select {
	case <-r.read:
	case <-time.After(5 * time.Second):
		t.Fatal("the terminal was not drained")
	}
	return r.cmd.ProcessState.ExitCode(), r.screen.String()
}

var csi = regexp.MustCompile(`\x1b\[[0-9;?]*[A-Za-z]`)

// screenLines is what a terminal shows line by line, less the escape
// codes (cursor moves, erases) and the line discipline's \r.
func screenLines(raw string) []string {
	return strings.Split(strings.ReplaceAll(csi.ReplaceAllString(raw, "\n"), "\r", ""), "\n")
}

// hasControl reports a control character other than a newline.
func hasControl(s string) bool {
	return strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 && r != '\n' || r == 0x7f })
}

// slipway prefetch on a 60-column terminal draws a bar per image while it
// pulls, redrawn in place, and no bar line is wider than the terminal,
// even for an image name longer than the whole line; on a pipe and on
// /dev/null the same run writes plain lines, one per image.
// sizePair is a bar's "done / total" in humanize.IBytes' units.
var sizePair = regexp.MustCompile(`\d[\d.]* [KMGTPE]?i?B / \d[\d.]* [KMGTPE]?i?B`)

func TestPrefetchProgressOnATerminal(t *testing.T) {
	t.Parallel()
	up := newCountingUpstream(t)
	long := "team/" + strings.Repeat("a-very-long-image-name-", 4) + "x:v1"
	held, _ := random.Image(64<<10, 1)
	other, _ := random.Image(8<<10, 2)
	for ref, img := range map[string]v1.Image{long: held, "team/short:v1": other} {
		if err := crane.Push(img, up.host+"/"+ref, crane.Insecure); err != nil {
			t.Fatal(err)
		}
	}
	layers, _ := held.Layers()
	ld, _ := layers[0].Digest()
	up.mu.Lock()
	up.hold, up.release = ld.String(), make(chan struct{})
	up.mu.Unlock()
	addr := freeAddr(t)
	p := start(t, nil, "serve", "--listen", addr, "--upstream", up.url, "--data-dir", t.TempDir())
	p.waitReady(t, addr)

	const cols = 60
	r := startOnPty(t, cols, 24, "prefetch", "--server=http://"+addr, long, "team/short:v1")
	// While the held layer is half way, its bar is on the screen.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(r.screen.String(), "…") {
		if time.Now().After(deadline) {
			t.Fatalf("no bar for %s within 10 s; the terminal got:\n%q", long, r.screen.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(400 * time.Millisecond) // a few more frames
	close(up.release)
	code, raw := r.wait(t, 20*time.Second)
	if code != 0 || !strings.Contains(r.stdout.String(), "prefetched 2 of 2 images") {
		t.Fatalf("prefetch on a terminal: exit %d\n%s\nterminal:\n%q", code, r.stdout.String(), raw)
	}
	if !strings.Contains(raw, "\x1b[") {
		t.Errorf("no escape codes: the bars were not redrawn in place:\n%q", raw)
	}
	bars := 0
	for _, l := range screenLines(raw) {
		if !strings.Contains(l, "]") { // summary lines have no brackets
			continue
		}
		bars++
		if w := utf8.RuneCountInString(l); w > cols {
			t.Errorf("a bar line of %d columns on a %d-column terminal: %q", w, cols, l)
		}
		// A name is cut to fit, never the sizes (which read "0 B / 0 B"
		// in a frame drawn before the sizes are known).
		if strings.Contains(l, "…") && !sizePair.MatchString(l) {
			t.Errorf("the sizes were cut from a bar line: %q", l)
		}
	}
	if bars < 2 {
		t.Errorf("%d bar lines drawn, want several:\n%q", bars, raw)
	}
	for _, want := range []string{long + ": 2 blobs", "team/short:v1: 3 blobs"} {
		if !strings.Contains(raw, want) {
			t.Errorf("no summary line %q on the terminal:\n%q", want, raw)
		}
	}

	// The same, cached now, with stderr on a pipe: one plain line per
	// image, nothing else.
	code, out, errOut := runOnce(t, nil, "prefetch", "--server=http://"+addr, long, "team/short:v1")
	if code != 0 || !strings.Contains(out, "prefetched 2 of 2 images") {
		t.Fatalf("prefetch on a pipe: exit %d\n%s%s", code, out, errOut)
	}
	lines := strings.Split(strings.TrimSuffix(errOut, "\n"), "\n")
	if hasControl(errOut) || len(lines) != 2 || !strings.Contains(errOut, long+": 2 blobs, 65 KiB, all cached") || !strings.Contains(errOut, "team/short:v1: 3 blobs, 17 KiB, all cached") {
		t.Errorf("prefetch on a pipe: want two plain lines, got\n%q", errOut)
	}

	// And with stderr on /dev/null (a character device, not a terminal).
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer devNull.Close()
	cmd := exec.Command(binPath, "prefetch", "--server=http://"+addr, long, "team/short:v1")
	cmd.Env, cmd.Dir, cmd.Stderr = cleanEnv(nil), t.TempDir(), devNull
	b, err := cmd.Output()
	if err != nil || !strings.Contains(string(b), "prefetched 2 of 2 images") {
		t.Errorf("prefetch with stderr on /dev/null: %v\n%s", err, b)
	}
	p.stop(t, syscall.SIGTERM, 10*time.Second)
}

// slipway verify on a terminal draws one bar with the throughput that fits
// the terminal; on a pipe it writes plain lines.
func TestVerifyProgressOnATerminal(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s, err := cache.Open(dir, cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		b := make([]byte, 1<<20)
		rand.Read(b)
		if err := s.PutBlob(bytes.NewReader(b), digest.FromBytes(b), cache.OriginPulled); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()

	const cols = 50
	r := startOnPty(t, cols, 24, "verify", "--data-dir", dir)
	code, raw := r.wait(t, 20*time.Second)
	if code != 0 || !strings.Contains(r.stdout.String(), "3 blobs, 3.0 MiB hashed") {
		t.Fatalf("verify on a terminal: exit %d\n%s\nterminal:\n%q", code, r.stdout.String(), raw)
	}
	var bar string
	for _, l := range screenLines(raw) {
		if strings.Contains(l, "]") {
			bar = l
			if w := utf8.RuneCountInString(l); w > cols {
				t.Errorf("a bar line of %d columns on a %d-column terminal: %q", w, cols, l)
			}
		}
	}
	if !strings.Contains(bar, "100 %") || !strings.Contains(bar, "3.0 MiB / 3.0 MiB") || !strings.Contains(bar, "/s") {
		t.Errorf("last bar %q: want 100 %%, 3.0 MiB / 3.0 MiB and a rate; the terminal got:\n%q", bar, raw)
	}
	if strings.Contains(raw, "verify: ") {
		t.Errorf("plain progress lines on a terminal:\n%q", raw)
	}

	code, out, errOut := runOnce(t, nil, "verify", "--data-dir", dir)
	if code != 0 || hasControl(errOut) || !regexp.MustCompile(`^(verify: +\d+% [^\n]+/s\n)+$`).MatchString(errOut) {
		t.Errorf("verify on a pipe: exit %d, want plain progress lines\n%s%q", code, out, errOut)
	}
	if !strings.Contains(errOut, "verify: 100% 3.0 MiB of 3.0 MiB") {
		t.Errorf("verify on a pipe: no final line\n%q", errOut)
	}
}
