// Command slipway is a pull-through caching OCI registry mirror and a local
// push target.
//
//	slipway serve [--listen ADDR] [--upstream URL] [--data-dir DIR] ...
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

const usage = `slipway: a pull-through caching OCI registry mirror and push target

Usage:
  slipway serve [flags]   run the mirror (slipway serve -h for flags)
  slipway prefetch [flags] IMAGE...
                          pull images through a mirror to warm its cache
  slipway verify [flags]  re-hash the blobs of a stopped server's data directory
  slipway gc [flags]      remove blobs no manifest references, from a stopped server's data directory
  slipway monitoring dashboard|rules
                          print a Grafana dashboard or Prometheus alert rules for slipway's metrics
  slipway version         print the version
`

var version = "dev"

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "serve":
		return serve(args[1:], stderr)
	case "prefetch":
		return prefetch(args[1:], stdout, stderr)
	case "verify":
		return verifyCmd(args[1:], stdout, stderr)
	case "gc":
		return gcCmd(args[1:], stdout, stderr)
	case "monitoring":
		return monitoringCmd(args[1:], stdout, stderr)
	case "version", "--version":
		fmt.Fprintln(stdout, "slipway", version)
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "slipway: unknown command %q\n\n%s", args[0], usage)
	return 2
}

type serveConfig struct {
	listen          string
	upstream        string
	dataDir         string
	tagTTL          time.Duration
	fillTimeout     time.Duration
	fillIdle        time.Duration
	shutdownTimeout time.Duration
	logFormat       string
	logLevel        string
	push            bool
	pushPrefix      string
	uploadTTL       time.Duration
	configPath      string
	life            lifecycleConfig
	fleet           fleetConfig
	metricsListen   string
	tlsCert         string
	tlsKey          string
	htpasswd        string
	anonymousPull   bool
	openAdmin       bool
	readHeader      time.Duration
	bodyStall       time.Duration
	sendStall       time.Duration

	file        *fileConfig // the config file's contents, if any
	upstreamSet bool        // --upstream or SLIPWAY_UPSTREAM was given

	args   []string          // the command line, read again by a reload
	values map[string]string // every setting's value, by flag name
	level  *slog.LevelVar    // the log level in use, which a reload sets
}

// serveFlags declares serve's flags. Each flag has an environment twin,
// SLIPWAY_<FLAG> with dashes as underscores; a flag on the command line
// wins over its twin.
func serveFlags(stderr io.Writer) (*flag.FlagSet, *serveConfig) {
	c := &serveConfig{}
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.listen, "listen", ":5000", "address to listen on")
	fs.StringVar(&c.upstream, "upstream", "https://registry-1.docker.io", "default upstream registry URL (http:// for one without TLS)")
	fs.StringVar(&c.dataDir, "data-dir", "./slipway-data", "directory for blobs and the index")
	fs.DurationVar(&c.tagTTL, "tag-ttl", 5*time.Minute, "how long a tag is served before it is revalidated with the upstream")
	fs.DurationVar(&c.fillTimeout, "fill-timeout", time.Hour, "longest time one upstream blob download may take")
	fs.DurationVar(&c.fillIdle, "fill-idle-timeout", time.Minute, "cancel a blob download when the upstream sends nothing for this long")
	fs.DurationVar(&c.shutdownTimeout, "shutdown-timeout", 30*time.Second, "how long shutdown waits for responses in flight")
	fs.StringVar(&c.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&c.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.BoolVar(&c.push, "push", true, "accept pushes into local repositories")
	fs.StringVar(&c.pushPrefix, "push-prefix", "", "comma-separated repository prefixes that may be pushed to (and are always local); empty: any name not proxied")
	fs.DurationVar(&c.uploadTTL, "upload-ttl", 24*time.Hour, "remove an unfinished upload after it sat unused this long")
	fs.StringVar(&c.configPath, "config", "", "YAML config file: upstreams, credentials, and any of these flags (see README)")
	fs.StringVar(&c.metricsListen, "metrics-listen", "", "also serve /metrics on this address (it is always on the main listener)")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "TLS certificate file (PEM, with intermediates); with --tls-key serves HTTPS and HTTP/2")
	fs.StringVar(&c.tlsKey, "tls-key", "", "TLS private key file (PEM)")
	fs.StringVar(&c.htpasswd, "htpasswd", "", "htpasswd file with bcrypt entries (htpasswd -B): clients must log in to push")
	fs.BoolVar(&c.anonymousPull, "anonymous-pull", true, "with --htpasswd, let clients without credentials pull")
	fs.BoolVar(&c.openAdmin, "open-admin", false, "without --htpasswd, let anyone who can reach the mirror call the admin calls that remove content (POST /v2/_slipway/gc, /v2/_slipway/verify)")
	fs.DurationVar(&c.readHeader, "read-header-timeout", 10*time.Second, "close a connection whose request headers take longer than this to arrive")
	fs.DurationVar(&c.bodyStall, "body-stall-timeout", time.Minute, "cut off a request body (a push) that brings less than 4 KiB in this long; 0: never")
	fs.DurationVar(&c.sendStall, "send-stall-timeout", time.Minute, "drop a client that takes in less than 256 KiB of a response in this long (it stopped reading); 0: never")
	c.life.register(fs)
	c.fleet.register(fs)
	return fs, c
}

func parseServe(args []string, stderr io.Writer) (*serveConfig, error) {
	// First pass: only to find --config (or SLIPWAY_CONFIG).
	probe, pc := serveFlags(io.Discard)
	applyEnv(probe)
	probe.Parse(args)

	fs, c := serveFlags(stderr)
	if pc.configPath != "" {
		fc, err := loadConfigFile(pc.configPath, fs)
		if err != nil {
			return nil, err
		}
		c.file = fc
	}
	if err := applyEnv(fs); err != nil {
		return nil, err
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	if c.readHeader <= 0 {
		return nil, errors.New("--read-header-timeout must be positive")
	}
	c.args, c.values = args, flagValues(fs)
	_, c.upstreamSet = os.LookupEnv("SLIPWAY_UPSTREAM")
	fs.Visit(func(f *flag.Flag) {
		if f.Name == "upstream" {
			c.upstreamSet = true
		}
	})
	return c, nil
}

// applyEnv sets each flag from its environment twin, SLIPWAY_<FLAG> with
// dashes as underscores.
func applyEnv(fs *flag.FlagSet) error {
	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		env := "SLIPWAY_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := os.LookupEnv(env); ok && envErr == nil {
			if err := f.Value.Set(v); err != nil {
				envErr = fmt.Errorf("%s: %w", env, err)
			}
		}
	})
	return envErr
}

func newLogger(format string, level slog.Leveler, w io.Writer) (*slog.Logger, error) {
	o := &slog.HandlerOptions{Level: level}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, o)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, o)), nil
	}
	return nil, fmt.Errorf("log format %q: want text or json", format)
}

func parseLevel(level string) (slog.Level, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return 0, fmt.Errorf("log level %q: %w", level, err)
	}
	return lv, nil
}

func serve(args []string, stderr io.Writer) int {
	c, err := parseServe(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "slipway serve:", err)
		return 2
	}
	c.level = new(slog.LevelVar)
	lv, err := parseLevel(c.logLevel)
	if err != nil {
		fmt.Fprintln(stderr, "slipway serve:", err)
		return 2
	}
	c.level.Set(lv)
	log, err := newLogger(c.logFormat, c.level, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "slipway serve:", err)
		return 2
	}
	routeGGCRLogs(log)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// SIGHUP reloads the configuration; several at once are one reload.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	reload := make(chan struct{})
	go func() {
		for {
			select {
			case <-hup:
				select {
				case reload <- struct{}{}:
				case <-ctx.Done():
					return
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	if err := serveUntil(ctx, c, log, reload, nil); err != nil {
		log.Error("slipway stopped", "err", err)
		return 1
	}
	return 0
}

func isDockerHub(rawURL string) bool {
	u, err := url.Parse(rawURL)
	if err != nil {
		return false
	}
	switch u.Hostname() {
	case "registry-1.docker.io", "index.docker.io", "docker.io":
		return true
	}
	return false
}

// splitList splits a comma-separated flag value, dropping empty entries.
func splitList(v string) []string {
	var out []string
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
