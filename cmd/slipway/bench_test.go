package main

import (
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
)

// BenchmarkServerPeakRSS runs the slipway binary as its own process and
// measures it from /proc: peak RSS (VmHWM) after 8 clients pull one
// uncached blob at once (one fill, seven joined) and after 8 more pull it
// warm, and the server's CPU seconds per GiB served warm.
//
//	go test -run '^$' -bench ServerPeakRSS -benchtime 1x ./cmd/slipway/
//
// SLIPWAY_BENCH_BLOB sets the blob size in bytes (default 1 GiB).
func BenchmarkServerPeakRSS(b *testing.B) {
	size := int64(1 << 30)
	if s, err := strconv.ParseInt(os.Getenv("SLIPWAY_BENCH_BLOB"), 10, 64); err == nil && s > 0 {
		size = s
	}
	blob := make([]byte, size)
	rand.Read(blob)
	d := digest.FromBytes(blob)
	up := httptest.NewServer(registry.New())
	defer up.Close()
	repo, _ := name.NewRepository(strings.TrimPrefix(up.URL, "http://") + "/bench/big")
	if err := remote.WriteLayer(repo, static.NewLayer(blob, types.OCILayer)); err != nil {
		b.Fatal(err)
	}
	blob = nil

	for i := 0; i < b.N; i++ {
		addr := benchFreeAddr(b)
		cmd := exec.Command(binPath, "serve", "--listen", addr, "--upstream", up.URL, "--data-dir", b.TempDir(), "--log-level", "warn")
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		pid := cmd.Process.Pid
		waitUp(b, "http://"+addr+"/v2/")
		url := "http://" + addr + "/v2/bench/big/blobs/" + string(d)

		pull8(b, url, size)
		cold := vmHWM(b, pid)
		cpu0 := cpuSeconds(b, pid)
		t0 := time.Now()
		pull8(b, url, size)
		elapsed := time.Since(t0)
		cpu := cpuSeconds(b, pid) - cpu0
		warm := vmHWM(b, pid)
		cmd.Process.Kill()
		cmd.Wait()

		gib := float64(8*size) / (1 << 30)
		b.ReportMetric(cold, "peak-MiB-after-cold")
		b.ReportMetric(warm, "peak-MiB-after-warm")
		b.ReportMetric(gib/elapsed.Seconds(), "warm-GiB/s")
		b.ReportMetric(cpu/gib, "server-CPU-s/GiB")
	}
}

var benchHTTP = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16, DisableCompression: true}}

// pull8 has 8 clients read url to the end at once.
func pull8(b *testing.B, url string, size int64) {
	var wg sync.WaitGroup
	for c := 0; c < 8; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := benchHTTP.Get(url)
			if err != nil {
				b.Error(err)
				return
			}
			defer resp.Body.Close()
			n, err := io.CopyBuffer(io.Discard, resp.Body, make([]byte, 256<<10))
			if err != nil || n != size || resp.StatusCode != 200 {
				b.Errorf("status %d, %d of %d bytes: %v", resp.StatusCode, n, size, err)
			}
		}()
	}
	wg.Wait()
}

func benchFreeAddr(b *testing.B) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func waitUp(b *testing.B, url string) {
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; i < 1000 && time.Now().Before(deadline); i++ {
		if resp, err := http.Get(url); err == nil {
			resp.Body.Close()
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	b.Fatal("server did not start")
}

// vmHWM is the process's peak resident set size, in MiB.
func vmHWM(b *testing.B, pid int) float64 {
	s, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(s), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			return kb / 1024
		}
	}
	b.Fatal("no VmHWM")
	return 0
}

// cpuSeconds is the process's user+system CPU time.
func cpuSeconds(b *testing.B, pid int) float64 {
	s, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// Fields after the command name, which is in parentheses.
	f := strings.Fields(string(s)[strings.LastIndexByte(string(s), ')')+2:])
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}
