package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"

	"slipway/cache/tier"
)

// slipbench fleet: three slipway replicas on one MinIO, in one run.
//
//   - Warm from the shared tier: a blob in the bucket, read through a
//     replica whose disk does not hold it, against a direct GET of the
//     same object from MinIO.
//   - The cold fill spread over the fleet: N clients over three replicas
//     ask at once for one uncached blob (upstream GETs, slowest client),
//     against the same N clients on one replica alone.
//
//	slipbench fleet --slipway ./slipway --minio ~/.cache/slipway-tools/minio-.../minio

type fleetResult struct {
	Machine            string  `json:"machine"`
	When               string  `json:"when"`
	WarmSizeBytes      int64   `json:"warm_size_bytes"`
	DirectMinIOGiBps   float64 `json:"direct_minio_gibps"`
	ColdDiskGiBps      float64 `json:"replica_cold_disk_gibps"`
	ColdDiskOverMinIO  float64 `json:"replica_over_minio"`
	ColdSizeBytes      int64   `json:"cold_size_bytes"`
	Clients            int     `json:"clients"`
	FleetUpstreamGETs  int64   `json:"fleet_upstream_gets"`
	FleetSlowestS      float64 `json:"fleet_slowest_seconds"`
	FleetTTFB          spread  `json:"fleet_ttfb"`
	SingleUpstreamGETs int64   `json:"single_upstream_gets"`
	SingleSlowestS     float64 `json:"single_slowest_seconds"`
	FleetOverSingle    float64 `json:"fleet_slowest_over_single"`
	Errors             int     `json:"errors"`
}

func fleetCommand(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("slipbench fleet", flag.ContinueOnError)
	fs.SetOutput(stderr)
	bin := fs.String("slipway", "", "the slipway binary")
	minio := fs.String("minio", os.Getenv("SLIPWAY_MINIO"), "the MinIO binary (default $SLIPWAY_MINIO)")
	warmS := fs.String("size", "1GiB", "size of the blob read warm from the shared tier")
	coldS := fs.String("cold-size", "256MiB", "size of the cold blob")
	clients := fs.Int("clients", 32, "clients of the cold fill")
	jsonOut := fs.String("json", "", "write the result as JSON to this file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *bin == "" || *minio == "" {
		return errors.New("fleet: --slipway and --minio are required")
	}
	warmSize, err := parseSize(*warmS)
	if err != nil {
		return err
	}
	coldSize, err := parseSize(*coldS)
	if err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "slipbench-fleet-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	logf := func(format string, a ...any) { fmt.Fprintf(stderr, "slipbench fleet: "+format+"\n", a...) }

	up, err := startUpstream("")
	if err != nil {
		return err
	}
	defer up.Close()
	warm, cold1, cold2 := randomBlob(warmSize, 101), randomBlob(coldSize, 102), randomBlob(coldSize, 103)
	wd, c1, c2 := digest.FromBytes(warm), digest.FromBytes(cold1), digest.FromBytes(cold2)
	for _, b := range [][]byte{warm, cold1, cold2} {
		up.blobs.add(digest.FromBytes(b), b)
	}
	warm, cold1, cold2 = nil, nil, nil

	m, err := startMinIO(*minio, filepath.Join(work, "minio"))
	if err != nil {
		return err
	}
	defer m.stop()
	ctx := context.Background()
	shared, err := tier.New(tier.Config{Endpoint: m.endpoint, Bucket: "bench", AccessKey: m.key, SecretKey: m.secret})
	if err != nil {
		return err
	}
	if err := shared.CreateBucket(ctx); err != nil {
		return err
	}
	token := randomHex(16)
	var peers []string
	for range 3 {
		a, err := freeAddr()
		if err != nil {
			return err
		}
		peers = append(peers, a)
	}
	replica := func(name string, peerFlags string) (*server, error) {
		cmd := fmt.Sprintf(`AWS_ACCESS_KEY_ID=%s AWS_SECRET_ACCESS_KEY=%s SLIPWAY_PEER_TOKEN=%s exec %q serve --listen "$SLIPBENCH_LISTEN" --upstream "$SLIPBENCH_UPSTREAM" --data-dir "$SLIPBENCH_DATA" --log-level warn --s3-endpoint %s --s3-bucket bench %s`,
			m.key, m.secret, token, *bin, m.endpoint, peerFlags)
		return startServer(cmd, up.URL, filepath.Join(work, name), io.Discard)
	}
	var fleet []*server
	for i, p := range peers {
		s, err := replica(fmt.Sprint("r", i), fmt.Sprintf("--peers %s --peer-listen %s", strings.Join(peers, ","), p))
		if err != nil {
			return err
		}
		defer s.Stop()
		fleet = append(fleet, s)
	}
	time.Sleep(2500 * time.Millisecond) // the replicas see each other
	res := fleetResult{Machine: describeMachine(), When: time.Now().UTC().Format(time.RFC3339), WarmSizeBytes: warmSize,
		ColdSizeBytes: coldSize, Clients: *clients}
	c := &http.Client{Transport: newTransport()}
	buf := make([]byte, readBuf)

	// Warm from the shared tier.
	logf("filling the %s warm blob through the fleet", sizeName(warmSize))
	if _, err := fetchOK(c, fleet[0].URL+"/v2/"+repoCold+"/blobs/"+string(wd), nil, buf, warmSize, true); err != nil {
		return err
	}
	for deadline := time.Now().Add(5 * time.Minute); ; {
		if _, err := shared.StatBlob(ctx, wd); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return errors.New("the warm blob never reached the shared tier")
		}
		time.Sleep(100 * time.Millisecond)
	}
	t0 := time.Now()
	body, _, err := shared.Blob(ctx, wd)
	if err != nil {
		return err
	}
	n, err := io.CopyBuffer(io.Discard, body, buf)
	body.Close()
	if err != nil || n != warmSize {
		return fmt.Errorf("direct MinIO GET: %d bytes, %v", n, err)
	}
	res.DirectMinIOGiBps = float64(warmSize) / gib / time.Since(t0).Seconds()
	lone, err := replica("lone", "") // alone on the bucket, with an empty disk
	if err != nil {
		return err
	}
	defer lone.Stop()
	f, err := fetchOK(c, lone.URL+"/v2/"+repoCold+"/blobs/"+string(wd), nil, buf, warmSize, false)
	if err != nil {
		return err
	}
	res.ColdDiskGiBps = float64(warmSize) / gib / f.total.Seconds()
	res.ColdDiskOverMinIO = res.ColdDiskGiBps / res.DirectMinIOGiBps
	logf("warm from the shared tier: replica with a cold disk %.2f GiB/s, direct MinIO GET %.2f GiB/s (%.2f ×)",
		res.ColdDiskGiBps, res.DirectMinIOGiBps, res.ColdDiskOverMinIO)

	// The cold fill: over the fleet, then on the lone replica.
	run := func(urls []string, d digest.Digest) (slowest time.Duration, ttfbs []time.Duration, errs int) {
		var wg sync.WaitGroup
		var mu sync.Mutex
		gate := make(chan struct{})
		for i := range *clients {
			cl := &http.Client{Transport: newTransport()}
			b := make([]byte, readBuf)
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-gate
				f, err := fetchOK(cl, urls[i%len(urls)]+"/v2/"+repoCold+"/blobs/"+string(d), nil, b, coldSize, false)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					errs++
					return
				}
				slowest = max(slowest, f.total)
				ttfbs = append(ttfbs, f.ttfb)
			}()
		}
		close(gate)
		wg.Wait()
		return slowest, ttfbs, errs
	}
	var urls []string
	for _, s := range fleet {
		urls = append(urls, s.URL)
	}
	slow, ttfbs, errs := run(urls, c2)
	res.FleetSlowestS, res.FleetTTFB, res.Errors = slow.Seconds(), spreadOf(ttfbs), errs
	res.FleetUpstreamGETs = up.count("GET blob " + string(c2))
	slow, _, errs = run([]string{lone.URL}, c1)
	res.SingleSlowestS, res.Errors = slow.Seconds(), res.Errors+errs
	res.SingleUpstreamGETs = up.count("GET blob " + string(c1))
	res.FleetOverSingle = res.FleetSlowestS / res.SingleSlowestS
	logf("cold fill of %s, %d clients: over 3 replicas %d upstream GETs, slowest %.2f s; one replica %d upstream GETs, slowest %.2f s (%.2f ×); %d errors",
		sizeName(coldSize), *clients, res.FleetUpstreamGETs, res.FleetSlowestS, res.SingleUpstreamGETs, res.SingleSlowestS, res.FleetOverSingle, res.Errors)
	fmt.Fprintf(stdout, "fleet (3 replicas, MinIO)\n  warm from S3   replica with a cold disk %.2f GiB/s = %.2f × a direct MinIO GET (%.2f GiB/s)\n  cold fill      %d clients over 3 replicas: %d upstream GETs, slowest %.2f s = %.2f × one replica's %.2f s\n",
		res.ColdDiskGiBps, res.ColdDiskOverMinIO, res.DirectMinIOGiBps, *clients, res.FleetUpstreamGETs, res.FleetSlowestS, res.FleetOverSingle, res.SingleSlowestS)
	if *jsonOut != "" {
		b, err := json.MarshalIndent(res, "", "  ")
		if err != nil {
			return err
		}
		return os.WriteFile(*jsonOut, b, 0o644)
	}
	if res.Errors > 0 {
		return fmt.Errorf("%d clients failed", res.Errors)
	}
	return nil
}

type minioProc struct {
	endpoint, key, secret string
	cmd                   *exec.Cmd
	done                  chan struct{}
}

func startMinIO(bin, dir string) (*minioProc, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	console, err := freeAddr()
	if err != nil {
		return nil, err
	}
	m := &minioProc{endpoint: "http://" + addr, key: "slipbench", secret: randomHex(16), done: make(chan struct{})}
	m.cmd = exec.Command(bin, "server", dir, "--address", addr, "--console-address", console, "--quiet")
	m.cmd.Env = append(os.Environ(), "MINIO_ROOT_USER="+m.key, "MINIO_ROOT_PASSWORD="+m.secret, "MINIO_BROWSER=off", "MINIO_UPDATE=off")
	m.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := m.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { m.cmd.Wait(); close(m.done) }()
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
		if resp, err := http.Get(m.endpoint + "/minio/health/ready"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return m, nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	m.stop()
	return nil, errors.New("MinIO not ready within 30 s")
}

func (m *minioProc) stop() {
	syscall.Kill(-m.cmd.Process.Pid, syscall.SIGKILL)
	<-m.done
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func sizeName(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20:
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d B", n)
}
