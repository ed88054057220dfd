package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"slipway/cache"
)

// slipway verify: re-hash every blob of a stopped server's data directory.
// The running server does the same on POST /v2/_slipway/verify.
func verifyCmd(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dataDir := fs.String("data-dir", "./slipway-data", "the data directory of a stopped slipway")
	quick := fs.Bool("quick", false, "check presence and size only, hash nothing")
	logLevel := fs.String("log-level", "warn", "log level: debug, info, warn, error")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: slipway verify [--data-dir DIR] [--quick]\n\nRe-hashes every stored blob; corrupt or missing pulled blobs leave the index\n(the next pull refills them), pushed ones are quarantined and reported.\nExit status 1 if anything was wrong.")
		fs.PrintDefaults()
	}
	if code, ok := parseToolFlags(fs, args, stderr); !ok {
		return code
	}
	store, log, code := openOffline(*dataDir, *logLevel, stderr)
	if store == nil {
		return code
	}
	defer store.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	p := newVerifyProgress(stderr)
	r, err := store.Verify(ctx, cache.VerifyOptions{Quick: *quick, Progress: p.update})
	p.done()
	if err != nil {
		log.Error("verify failed", "err", err)
		return 1
	}
	mode := "hashed"
	if *quick {
		mode = "checked (quick: presence and size)"
	}
	rate := ""
	if s := r.Dur.Seconds(); s > 0 && !*quick {
		rate = fmt.Sprintf(", %s/s", sizeText(int64(float64(r.Bytes)/s)))
	}
	fmt.Fprintf(stdout, "%d blobs, %s %s in %s%s\n", r.Blobs, sizeText(r.Bytes), mode, r.Dur.Round(time.Millisecond), rate)
	for _, pr := range r.Problems {
		loud := ""
		if pr.Origin == cache.OriginPushed.String() {
			loud = "  PUSHED CONTENT: push it again"
		}
		fmt.Fprintf(stdout, "BAD %s (%s, %d bytes): %s: %s%s\n", pr.Digest, pr.Origin, pr.Size, pr.Error, pr.Action, loud)
	}
	if !r.OK() {
		fmt.Fprintf(stdout, "%d problems\n", len(r.Problems))
		return 1
	}
	fmt.Fprintln(stdout, "ok")
	return 0
}

// parseToolFlags parses a subcommand's flags after their environment twins.
func parseToolFlags(fs *flag.FlagSet, args []string, stderr io.Writer) (int, bool) {
	if err := applyEnv(fs); err != nil {
		fmt.Fprintf(stderr, "slipway %s: %v\n", fs.Name(), err)
		return 2, false
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0, false
		}
		return 2, false
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "slipway %s: unexpected arguments: %v\n", fs.Name(), fs.Args())
		return 2, false
	}
	return 0, true
}

// openOffline opens a data directory with no background work (recovery
// still runs). A running server holds the index's lock: say what to do.
func openOffline(dir, level string, stderr io.Writer, tweaks ...func(*cache.Options)) (*cache.Store, *slog.Logger, int) {
	var log *slog.Logger
	lv, err := parseLevel(level)
	if err == nil {
		log, err = newLogger("text", lv, stderr)
	}
	if err != nil {
		fmt.Fprintln(stderr, "slipway:", err)
		return nil, nil, 2
	}
	if _, err := os.Stat(dir); err != nil {
		fmt.Fprintln(stderr, "slipway:", err)
		return nil, nil, 1
	}
	o := cache.Options{Logger: log, GCEvery: -1, MaintenanceInterval: time.Hour}
	for _, tw := range tweaks {
		tw(&o)
	}
	store, err := cache.Open(dir, o)
	if err != nil {
		if strings.Contains(err.Error(), "LOCK") || strings.Contains(err.Error(), "lock") {
			fmt.Fprintf(stderr, "slipway: %s is in use (is slipway serve running? use its POST /v2/_slipway/verify or /v2/_slipway/gc): %v\n", dir, err)
		} else {
			fmt.Fprintln(stderr, "slipway:", err)
		}
		return nil, nil, 1
	}
	return store, log, 0
}
