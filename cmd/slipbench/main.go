// Command slipbench measures a registry mirror: warm blob and manifest
// reads, a cold fill that many clients join, pushes, and the server's peak
// memory. It starts its own upstream (go-containerregistry's registry on
// loopback, seeded with random blobs and counting what it is asked), starts
// the registry under test from a shell command pointed at it, and prints a
// table and JSON. The same tool measures slipway, distribution and a
// ceiling server, so that results are ratios taken in one run on one
// machine (see compare.sh).
//
//	slipbench run --name slipway --server 'exec slipway serve --listen "$SLIPBENCH_LISTEN" --upstream "$SLIPBENCH_UPSTREAM" --data-dir "$SLIPBENCH_DATA"'
//	slipbench ceiling --listen ADDR --upstream URL --dir DIR
//	slipbench compare slipway.json distribution.json ceiling.json
//	slipbench fleet --slipway ./slipway --minio ./minio
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/dustin/go-humanize"
)

func main() {
	if err := dispatch(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "slipbench:", err)
		os.Exit(1)
	}
}

func dispatch(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return errors.New("usage: slipbench run|ceiling|compare|fleet [flags]")
	}
	switch args[0] {
	case "run":
		return runCommand(args[1:], stdout, stderr)
	case "ceiling":
		return ceilingCommand(args[1:], stderr)
	case "compare":
		return compareCommand(args[1:], stdout)
	case "fleet":
		return fleetCommand(args[1:], stdout, stderr)
	}
	return fmt.Errorf("unknown command %q: want run, ceiling, compare or fleet", args[0])
}

var allScenarios = []string{"warm-blob", "warm-manifest", "cold-fill", "push"}

type runConfig struct {
	name                string
	server, pushServer  string
	scenarios           map[string]bool
	jsonOut, work       string
	upstreamListen      string
	blobSize, coldSize  int64
	pushSize, chunkSize int64
	pusherSize          int64
	clients, reps       int
	conns, coldClients  int
	pushers, pushReps   int
	linkRate            int64 // bytes/s of the upstream link in the second cold fill
	duration            time.Duration
	serverLog           string
}

func (c runConfig) runs(s string) bool { return c.scenarios[s] }

func runCommand(args []string, stdout, stderr io.Writer) error {
	var c runConfig
	fs := flag.NewFlagSet("slipbench run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.name, "name", "server", "label for the registry under test")
	fs.StringVar(&c.server, "server", "", "shell command that starts the registry under test (it gets SLIPBENCH_LISTEN, SLIPBENCH_UPSTREAM, SLIPBENCH_DATA and should exec the server)")
	fs.StringVar(&c.pushServer, "push-server", "", "command for the push scenario, if it differs (a proxy that refuses pushes)")
	scen := fs.String("scenarios", strings.Join(allScenarios, ","), "comma-separated: "+strings.Join(allScenarios, ", "))
	fs.StringVar(&c.jsonOut, "json", "", "write the result as JSON to this file")
	fs.StringVar(&c.work, "work", "", "directory for the servers' data and dd (default: a new one under $TMPDIR); the disk being measured")
	fs.StringVar(&c.upstreamListen, "upstream-listen", "127.0.0.1:0", "address of the seeded upstream")
	fs.StringVar(&c.serverLog, "server-log", "", "append the server's output to this file (default: discarded)")
	blob := fs.String("blob-size", "1GiB", "warm blob size")
	cold := fs.String("cold-size", "256MiB", "cold fill blob size")
	push := fs.String("push-size", "1GiB", "pushed blob size (a multiple of 4 MiB, for dd)")
	chunk := fs.String("chunk-size", "64MiB", "chunk size of the chunked push")
	pusher := fs.String("pusher-size", "256MiB", "size of the blob pushed concurrently")
	fs.IntVar(&c.clients, "clients", 8, "concurrent clients of the warm blob")
	fs.IntVar(&c.reps, "reps", 3, "reads of the warm blob per client, per measurement")
	fs.IntVar(&c.conns, "conns", 64, "connections of the warm manifest scenario")
	fs.DurationVar(&c.duration, "duration", 10*time.Second, "length of the warm manifest scenario")
	fs.IntVar(&c.coldClients, "cold-clients", 32, "clients that ask for the cold blob at once")
	fs.IntVar(&c.pushers, "pushers", 16, "concurrent pushes of one blob")
	fs.IntVar(&c.pushReps, "push-reps", 3, "monolithic and chunked pushes, each paired with a dd; the median counts")
	link := fs.String("upstream-link", "0", "if set (e.g. 200MiB), the cold fill runs again with the upstream's blob bodies sharing this many bytes per second, as over a site's internet link")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if c.server == "" {
		return errors.New("run: --server is required")
	}
	if c.pushServer == "" {
		c.pushServer = c.server
	}
	c.scenarios = map[string]bool{}
	for _, s := range strings.Split(*scen, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		if !slices.Contains(allScenarios, s) {
			return fmt.Errorf("unknown scenario %q", s)
		}
		c.scenarios[s] = true
	}
	for _, sz := range []struct {
		flag string
		v    string
		to   *int64
	}{{"blob-size", *blob, &c.blobSize}, {"cold-size", *cold, &c.coldSize}, {"push-size", *push, &c.pushSize}, {"chunk-size", *chunk, &c.chunkSize}, {"pusher-size", *pusher, &c.pusherSize}} {
		n, err := parseSize(sz.v)
		if err != nil {
			return fmt.Errorf("--%s: %w", sz.flag, err)
		}
		*sz.to = n
	}
	if *link != "0" {
		n, err := parseSize(*link)
		if err != nil {
			return fmt.Errorf("--upstream-link: %w", err)
		}
		c.linkRate = n
	}
	if c.pushSize%(4<<20) != 0 || c.pusherSize > c.pushSize {
		return errors.New("--push-size must be a multiple of 4MiB and at least --pusher-size")
	}
	if c.clients < 1 || c.reps < 1 || c.conns < 1 || c.coldClients < 1 || c.pushers < 1 || c.pushReps < 1 {
		return errors.New("counts must be at least 1")
	}
	res, err := run(c, stderr)
	if res != nil {
		printResult(stdout, res)
		if c.jsonOut != "" {
			if werr := writeJSON(c.jsonOut, res); werr != nil && err == nil {
				err = werr
			}
		}
	}
	return err
}

// run seeds the upstream, then runs the read scenarios against one server
// process and the push scenario against a fresh one.
func run(c runConfig, logTo io.Writer) (*result, error) {
	work := c.work
	if work == "" {
		d, err := os.MkdirTemp("", "slipbench-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(d)
		work = d
	}
	serverOut := io.Discard
	if c.serverLog != "" {
		f, err := os.OpenFile(c.serverLog, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		serverOut = f
	}
	up, err := startUpstream(c.upstreamListen)
	if err != nil {
		return nil, err
	}
	defer up.Close()
	res := &result{Name: c.name, Machine: describeMachine(), When: time.Now().UTC().Format(time.RFC3339)}
	b := &bench{cfg: c, up: up, res: res, log: logTo}
	b.logf("seeding %s", up.URL)
	if err := b.seed(); err != nil {
		return res, err
	}

	if c.runs("warm-blob") || c.runs("warm-manifest") || c.runs("cold-fill") {
		s, err := startServer(c.server, up.URL, filepath.Join(work, c.name+"-read"), serverOut)
		if err != nil {
			return res, err
		}
		err = b.readScenarios(s)
		s.Stop()
		if err != nil {
			return res, err
		}
	}
	if c.runs("push") {
		s, err := startServer(c.pushServer, up.URL, filepath.Join(work, c.name+"-push"), serverOut)
		if err != nil {
			return res, err
		}
		err = b.push(s, work)
		if err == nil {
			res.PeakRSSAfterPushMiB, err = peakRSS(s.Pid())
		}
		s.Stop()
		if err != nil {
			return res, err
		}
	}
	return res, nil
}

func (b *bench) readScenarios(s *server) error {
	var err error
	if b.cfg.runs("warm-blob") {
		if err := b.warmBlob(s); err != nil {
			return fmt.Errorf("warm blob: %w", err)
		}
		if b.res.PeakRSSAfterWarmBlobMiB, err = peakRSS(s.Pid()); err != nil {
			return err
		}
	}
	if b.cfg.runs("warm-manifest") {
		if err := b.warmManifest(s); err != nil {
			return fmt.Errorf("warm manifest: %w", err)
		}
	}
	if b.cfg.runs("cold-fill") {
		b.res.ColdFill = &coldFillResult{}
		if err := b.coldFill(s, b.res.ColdFill, b.cold[0], b.cold[1], 0); err != nil {
			return fmt.Errorf("cold fill: %w", err)
		}
		if b.cfg.linkRate > 0 {
			b.res.ColdFillLink = &coldFillResult{}
			if err := b.coldFill(s, b.res.ColdFillLink, b.cold[2], b.cold[3], b.cfg.linkRate); err != nil {
				return fmt.Errorf("cold fill %s: %w", rateName(b.cfg.linkRate), err)
			}
		}
		if b.res.PeakRSSAfterColdFillMiB, err = peakRSS(s.Pid()); err != nil {
			return err
		}
	}
	return nil
}

// parseSize reads a positive size of at most 1 TiB, with go-humanize's
// units as slipway's --max-size reads them: 123, 64KiB, 256MiB, 1GiB, 500MB.
func parseSize(s string) (int64, error) {
	n, err := humanize.ParseBytes(s)
	if err != nil || strings.Contains(s, ",") || n == 0 || n > 1<<40 {
		return 0, fmt.Errorf("bad size %q: want a positive size of at most 1TiB, such as 64KiB, 256MiB or 1GiB", s)
	}
	return int64(n), nil
}
