package main

import (
	"flag"
	"fmt"
	"log/slog"
	"math"
	"net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/dustin/go-humanize"

	"slipway/cache"
)

// lifecycleConfig is serve's cache-lifecycle flags: the size budget, its
// watermarks, pins and the GC grace period.
type lifecycleConfig struct {
	maxSize       sizeFlag
	lowWatermark  float64
	highWatermark float64
	pin           string
	gcGrace       time.Duration
	gcMinGrace    time.Duration
}

func (l *lifecycleConfig) register(fs *flag.FlagSet) {
	fs.Var(&l.maxSize, "max-size", "cache budget for blobs: bytes with a unit (20GiB, 500MB) or a share of the data dir's filesystem (80%); empty: no budget")
	fs.Float64Var(&l.lowWatermark, "low-watermark", 0.90, "eviction frees space down to this fraction of --max-size")
	fs.Float64Var(&l.highWatermark, "high-watermark", 0.95, "eviction starts when blobs pass this fraction of --max-size")
	fs.StringVar(&l.pin, "pin", "", "comma-separated images never evicted: upstream/repo:tag patterns (docker.io/library/golang:*), upstream/repo, or a whole upstream")
	fs.DurationVar(&l.gcGrace, "gc-grace", 24*time.Hour, "keep a blob or manifest nothing references for this long after its last use before GC removes it")
	gcMinGraceFlag(fs, &l.gcMinGrace)
}

// gcMinGraceFlag declares --gc-min-grace, for serve and gc.
func gcMinGraceFlag(fs *flag.FlagSet, p *time.Duration) {
	fs.DurationVar(p, "gc-min-grace", time.Hour, "the shortest GC grace accepted (--gc-grace, ?grace=): a shorter one removes the layers of pushes whose manifest has not arrived yet; 0: no minimum")
}

// minGrace maps --gc-min-grace to cache.Options.MinGCGrace: 0 there is
// the default, here it is "none".
func minGrace(d time.Duration) time.Duration {
	if d <= 0 {
		return -1
	}
	return d
}

// storeOptions turns the flags into the store's options. Pins name
// upstreams as the config does (name, alias or host); the store knows them
// by host.
func (l *lifecycleConfig) storeOptions(c *serveConfig, log *slog.Logger) (cache.Options, error) {
	o := cache.Options{Logger: log, GCGrace: l.gcGrace, MinGCGrace: minGrace(l.gcMinGrace)}
	if l.gcMinGrace > 0 && l.gcGrace < l.gcMinGrace {
		return o, fmt.Errorf("--gc-grace %s is under --gc-min-grace %s", l.gcGrace, l.gcMinGrace)
	}
	if !(l.lowWatermark > 0 && l.lowWatermark <= l.highWatermark && l.highWatermark <= 1) {
		return o, fmt.Errorf("watermarks: want 0 < --low-watermark (%g) <= --high-watermark (%g) <= 1", l.lowWatermark, l.highWatermark)
	}
	o.LowWatermark, o.HighWatermark = l.lowWatermark, l.highWatermark
	max, err := l.maxSize.resolve(c.dataDir)
	if err != nil {
		return o, err
	}
	o.MaxSize = max
	if l.pin != "" {
		specs, _, err := upstreamSpecs(c)
		if err != nil {
			return o, err
		}
		for _, p := range splitList(l.pin) {
			pin, err := parsePin(p, specs)
			if err != nil {
				return o, err
			}
			o.Pins = append(o.Pins, pin)
		}
	}
	return o, nil
}

// parsePin reads upstream[/repo[:tag]], where upstream is an upstream's
// name, alias or host, and repo and tag may be glob patterns.
func parsePin(p string, specs []upstreamSpec) (cache.Pin, error) {
	first, rest, _ := strings.Cut(p, "/")
	for _, s := range specs {
		u, err := url.Parse(s.url)
		if err != nil {
			continue
		}
		names := append([]string{s.name, u.Host}, s.aliases...)
		hub := isDockerHub(s.url)
		if hub {
			names = append(names, "docker.io", "index.docker.io", "registry-1.docker.io")
		}
		for _, n := range names {
			if !strings.EqualFold(n, first) {
				continue
			}
			pin := cache.Pin{NS: u.Host}
			if rest == "" {
				return pin, nil
			}
			repo, tag := rest, ""
			if i := strings.LastIndex(rest, ":"); i > strings.LastIndex(rest, "/") {
				repo, tag = rest[:i], rest[i+1:]
			}
			if hub && !strings.Contains(repo, "/") {
				repo = "library/" + repo
			}
			pin.Repo, pin.Tag = repo, tag
			return pin, nil
		}
	}
	return cache.Pin{}, fmt.Errorf("pin %q: %q is not a configured upstream", p, first)
}

// sizeFlag is a byte count with a unit, or a percentage of a filesystem.
type sizeFlag struct {
	text  string
	bytes int64
	share float64 // of the data dir's filesystem, when set
}

func (f *sizeFlag) String() string { return f.text }

func (f *sizeFlag) Set(v string) error {
	v = strings.TrimSpace(v)
	*f = sizeFlag{text: v}
	if v == "" || v == "0" {
		return nil
	}
	if p, ok := strings.CutSuffix(v, "%"); ok {
		n, err := strconv.ParseFloat(strings.TrimSpace(p), 64)
		if err != nil || n <= 0 || n > 100 {
			return fmt.Errorf("size %q: want a percentage in (0, 100]", v)
		}
		f.share = n / 100
		return nil
	}
	n, err := parseSize(v)
	if err != nil {
		return err
	}
	f.bytes = n
	return nil
}

// resolve returns the budget in bytes; a percentage is of dir's filesystem.
func (f *sizeFlag) resolve(dir string) (int64, error) {
	if f.share == 0 {
		return f.bytes, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, err
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("--max-size %s: %w", f.text, err)
	}
	return int64(f.share * float64(st.Blocks) * float64(st.Bsize)), nil
}

// parseSize reads a byte count with an optional unit, through go-humanize:
// decimal "k", "MB", "G", "T" (1000s), binary "KiB", "Mi", "GiB", "TiB"
// (1024s), in any case, with or without a space: "20GiB", "500MB",
// "1.5T", "2 gib", "1048576". A comma is refused: go-humanize reads "1,5G"
// as 15 GB, which is not what someone who wrote it meant.
func parseSize(v string) (int64, error) {
	n, err := humanize.ParseBytes(v)
	if err != nil || strings.Contains(v, ",") || n > math.MaxInt64/2 {
		return 0, fmt.Errorf("size %q: want a number with a unit such as 500MB, 20GiB or 2T, or a percentage such as 80%%", v)
	}
	return int64(n), nil
}

// sizeText prints n in binary units ("3.5 MiB", "149 MiB"), as every size
// slipway prints.
func sizeText(n int64) string { return humanize.IBytes(uint64(max(n, 0))) }
