package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"slipway/cache"
)

func TestParseSize(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]int64{
		"0": 0, "1048576": 1 << 20, "500MB": 500e6, "20GiB": 20 << 30, "1.5T": 1.5e12, "2 gib": 2 << 30, "10k": 10e3,
		"2MB": 2e6, "10GiB": 10 << 30, "64KiB": 64 << 10, "1kb": 1e3, "3 MiB": 3 << 20, "2g": 2e9, "1TiB": 1 << 40,
		"512b": 512, "0.5GiB": 1 << 29, "1.5 TB": 1.5e12, "7 m": 7e6,
	} {
		var f sizeFlag
		if err := f.Set(in); err != nil || f.bytes != want {
			t.Errorf("%q: %d, %v; want %d", in, f.bytes, err, want)
		}
	}
	for _, in := range []string{"20XB", "-1G", "GiB", "1e400", "0%", "101%", "x%", "1,5G", "1_000", "0x10", "5 GiBs", "9EiB"} {
		var f sizeFlag
		if err := f.Set(in); err == nil {
			t.Errorf("%q: no error", in)
		}
	}
	var f sizeFlag
	if err := f.Set("50%"); err != nil {
		t.Fatal(err)
	}
	n, err := f.resolve(t.TempDir())
	if err != nil || n <= 0 {
		t.Fatalf("50%% of the filesystem: %d, %v", n, err)
	}
}

// Every size slipway prints comes from one formatter.
func TestSizeText(t *testing.T) {
	t.Parallel()
	for n, want := range map[int64]string{
		0: "0 B", 512: "512 B", 1536: "1.5 KiB", 3<<20 + 1<<19: "3.5 MiB", 148<<20 + 600<<10: "149 MiB",
		20 << 30: "20 GiB", 3 << 40: "3.0 TiB", -1: "0 B",
	} {
		if got := sizeText(n); got != want {
			t.Errorf("sizeText(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestParsePin(t *testing.T) {
	t.Parallel()
	specs := []upstreamSpec{
		{name: "docker.io", url: "https://registry-1.docker.io", aliases: []string{"hub"}},
		{name: "ghcr.io", url: "https://ghcr.io"},
	}
	for in, want := range map[string]cache.Pin{
		"docker.io/library/golang:*": {NS: "registry-1.docker.io", Repo: "library/golang", Tag: "*"},
		"hub/golang:1.2*":            {NS: "registry-1.docker.io", Repo: "library/golang", Tag: "1.2*"},
		"ghcr.io":                    {NS: "ghcr.io"},
		"ghcr.io/org/tool":           {NS: "ghcr.io", Repo: "org/tool"},
		"GHCR.IO/org/*:v1":           {NS: "ghcr.io", Repo: "org/*", Tag: "v1"},
	} {
		got, err := parsePin(in, specs)
		if err != nil || got != want {
			t.Errorf("%q: %+v, %v; want %+v", in, got, err, want)
		}
	}
	if _, err := parsePin("quay.io/x", specs); err == nil {
		t.Error("an unknown upstream was accepted")
	}
}

// slipway verify and slipway gc on a stopped server's data directory: a
// clean directory exits 0; a flipped byte exits 1 and names the blob; the
// next verify is clean again.
func TestVerifyAndGCCommands(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s, err := cache.Open(dir, cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	good := []byte("a good blob")
	bad := bytes.Repeat([]byte("to be corrupted "), 100)
	for _, b := range [][]byte{good, bad} {
		if err := s.PutBlob(bytes.NewReader(b), digest.FromBytes(b), cache.OriginPulled); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()

	code, out, errOut := runOnce(t, nil, "verify", "--data-dir", dir)
	if code != 0 || !strings.Contains(out, "2 blobs") || !strings.Contains(out, "ok") {
		t.Fatalf("clean verify: exit %d\n%s%s", code, out, errOut)
	}
	if !strings.Contains(errOut, "verify: 100%") {
		t.Errorf("no plain progress line when not on a terminal: %q", errOut)
	}
	d := digest.FromBytes(bad)
	p := filepath.Join(dir, "blobs", "sha256", d.Encoded()[:2], d.Encoded())
	raw, _ := os.ReadFile(p)
	raw[7] ^= 0x20
	os.WriteFile(p, raw, 0o644)
	if code, out, _ := runOnce(t, nil, "verify", "--data-dir", dir, "--quick"); code != 0 {
		t.Fatalf("quick verify sees a flipped byte? exit %d\n%s", code, out)
	}
	code, out, errOut = runOnce(t, nil, "verify", "--data-dir", dir)
	if code != 1 || !strings.Contains(out, "BAD "+string(d)) {
		t.Fatalf("verify of a corrupt blob: exit %d\n%s%s", code, out, errOut)
	}
	if code, out, _ := runOnce(t, nil, "verify", "--data-dir", dir); code != 0 || !strings.Contains(out, "1 blobs") {
		t.Fatalf("verify after removal: exit %d\n%s", code, out)
	}

	// A grace under the minimum is refused, unless the minimum is lowered.
	if code, out, errOut := runOnce(t, nil, "gc", "--data-dir", dir, "--gc-grace", "1ns"); code != 2 || !strings.Contains(errOut, "--gc-min-grace") {
		t.Fatalf("gc --gc-grace 1ns: exit %d\n%s%s", code, out, errOut)
	}
	code, out, errOut = runOnce(t, nil, "gc", "--data-dir", dir, "--dry-run", "--gc-grace", "1ns", "--gc-min-grace", "0")
	if code != 0 || !strings.Contains(out, "would remove 1 blobs") {
		t.Fatalf("gc --dry-run: exit %d\n%s%s", code, out, errOut)
	}
	code, out, errOut = runOnce(t, nil, "gc", "--data-dir", dir, "--gc-grace", "1ns", "--gc-min-grace", "0")
	if code != 0 || !strings.Contains(out, "removed 1 blobs") || !strings.Contains(out, "0 blobs (0 B) and 0 manifests (0 B) stored") {
		t.Fatalf("gc: exit %d\n%s%s", code, out, errOut)
	}
	if code, _, _ := runOnce(t, nil, "verify", "--data-dir", filepath.Join(dir, "nope")); code != 1 {
		t.Errorf("verify of a missing directory: exit %d", code)
	}
	if code, _, _ := runOnce(t, nil, "verify", "extra"); code != 2 {
		t.Errorf("verify with an argument: exit %d", code)
	}
}

// A bad --max-size is a usage error; a budget works end to end.
func TestServeMaxSizeFlag(t *testing.T) {
	t.Parallel()
	if code, _, errOut := runOnce(t, nil, "serve", "--max-size", "lots"); code != 2 || !strings.Contains(errOut, "max-size") {
		t.Errorf("bad --max-size: exit %d, %q", code, errOut)
	}
	if code, _, errOut := runOnce(t, []string{"SLIPWAY_PIN=nowhere.example/x"}, "serve", "--listen", freeAddr(t)); code != 1 || !strings.Contains(errOut, "not a configured upstream") {
		t.Errorf("pin of an unknown upstream: exit %d, %q", code, errOut)
	}
}
