package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"slipway/cache"
	"slipway/cache/tier"
)

// slipway gc: remove manifests and blobs nothing references any more
// (see cache/live.go), from a stopped server's data directory; with the
// --s3-* flags, from the fleet's shared tier too, under its lease. The running server does it every hour, and on
// POST /v2/_slipway/gc.
func gcCmd(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("gc", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dataDir := fs.String("data-dir", "./slipway-data", "the data directory of a stopped slipway")
	dry := fs.Bool("dry-run", false, "list what would be removed, remove nothing")
	grace := fs.Duration("gc-grace", 24*time.Hour, "keep what nothing references when it was stored or used more recently than this")
	var minG time.Duration
	gcMinGraceFlag(fs, &minG)
	var fc fleetConfig
	fc.registerS3(fs)
	logLevel := fs.String("log-level", "warn", "log level: debug, info, warn, error")
	if code, ok := parseToolFlags(fs, args, stderr); !ok {
		return code
	}
	if minG > 0 && *grace < minG {
		fmt.Fprintf(stderr, "slipway gc: --gc-grace %s is under --gc-min-grace %s\n", *grace, minG)
		return 2
	}
	var shared *tier.Client
	if fc.enabled() {
		var err error
		if shared, err = fc.tierClient(); err != nil {
			fmt.Fprintln(stderr, "slipway gc:", err)
			return 2
		}
	}
	store, log, code := openOffline(*dataDir, *logLevel, stderr, func(o *cache.Options) {
		o.MinGCGrace, o.Shared = minGrace(minG), shared
	})
	if store == nil {
		return code
	}
	defer store.Close()
	if shared != nil {
		// The shared tier: one replica at a time, under its lease.
		sr, err := store.SharedGC(context.Background(), cache.GCOptions{DryRun: *dry, Grace: *grace})
		if err != nil {
			log.Error("shared gc failed", "err", err)
			return 1
		}
		if !sr.Held {
			fmt.Fprintln(stdout, "shared gc: another replica holds the lease; nothing done there")
		} else {
			fmt.Fprintf(stdout, "shared gc: %d blobs (%s) and %d manifests; %d digests live\n", sr.Blobs, sizeText(sr.Bytes), sr.Manifests, sr.Live)
		}
	}
	r, err := store.GC(cache.GCOptions{DryRun: *dry, Grace: *grace})
	if err != nil {
		log.Error("gc failed", "err", err)
		return 1
	}
	verb := "removed"
	if *dry {
		verb = "would remove"
	}
	for _, d := range r.Removed {
		fmt.Fprintln(stdout, d)
	}
	st := store.Stats()
	fmt.Fprintf(stdout, "gc %s %d blobs (%s), %d manifests (%s) and %d links in %s; %d blobs (%s) and %d manifests (%s) stored\n",
		verb, r.Blobs, sizeText(r.Bytes), r.Manifests, sizeText(r.ManifestBytes), r.Links,
		r.Dur.Round(time.Millisecond), st.Blobs, sizeText(st.BlobBytes), st.Manifests, sizeText(st.ManifestBytes))
	return 0
}
