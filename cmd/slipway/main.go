// Command slipway is a pull-through caching OCI registry mirror and a local
// push target.
//
//	slipway serve [--listen ADDR] [--upstream URL] [--data-dir DIR] ...
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"slipway/cache"
	"slipway/mirror"
	"slipway/push"
	"slipway/upstream"
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

func newLogger(format, level string, w io.Writer) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: %w", level, err)
	}
	o := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, o)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, o)), nil
	}
	return nil, fmt.Errorf("log format %q: want text or json", format)
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
	log, err := newLogger(c.logFormat, c.logLevel, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "slipway serve:", err)
		return 2
	}
	routeGGCRLogs(log)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := serveUntil(ctx, c, log, nil); err != nil {
		log.Error("slipway stopped", "err", err)
		return 1
	}
	return 0
}

// serveUntil runs the mirror until ctx is done, then shuts down in order:
// stop HTTP (letting responses in flight finish), stop the upload reaper,
// cancel and wait for fills, close the store. ready, if not nil, receives
// the listening address.
func serveUntil(ctx context.Context, c *serveConfig, log *slog.Logger, ready chan<- string) error {
	opts, err := c.life.storeOptions(c, log)
	if err != nil {
		return err
	}
	fleet, err := c.fleet.newFleet(log)
	if err != nil {
		return err
	}
	if c.fleet.enabled() {
		if opts.Shared, err = c.fleet.tierClient(); err != nil {
			return err
		}
		if fleet != nil {
			opts.UploadIDPrefix = fleet.ID()
		}
	}
	store, err := cache.Open(c.dataDir, opts)
	if err != nil {
		return err
	}
	defer store.Close()
	if fleet != nil {
		fleet.Start()
		defer fleet.Close()
		log.Info("fleet", "self", fleet.Self(), "id", fleet.ID(), "alive", strings.Join(fleet.Alive(), ","))
	}

	specs, def, err := upstreamSpecs(c)
	if err != nil {
		return err
	}
	fills := upstream.NewFiller(store, upstream.FillerOptions{Logger: log, Timeout: c.fillTimeout, IdleTimeout: c.fillIdle, Fleet: fleet})
	defer fills.Close()
	// Without --push, what was pushed before is still served.
	pushes, err := push.New(push.Config{Store: store, Logger: log, Prefixes: splitList(c.pushPrefix),
		UploadTTL: c.uploadTTL, ReadOnly: !c.push})
	if err != nil {
		return err
	}
	defer pushes.Close()
	var ups []mirror.Upstream
	for _, sp := range specs {
		up, err := upstream.New(upstream.Config{URL: sp.url, Auth: sp.auth, AllowPrivate: sp.allowPrivate,
			MaxConcurrent: sp.maxConc, Logger: log})
		if err != nil {
			return fmt.Errorf("upstream %q: %w", sp.name, err)
		}
		proxy := upstream.NewProxy(up, store, fills, upstream.ProxyOptions{Logger: log, TagTTL: sp.tagTTL,
			NegativeTTL: sp.negativeTTL, StaleOn404: sp.staleOn404, Fleet: fleet})
		names := append([]string{}, sp.aliases...)
		if !strings.Contains(sp.name, "/") {
			names = append(names, sp.name)
		}
		ups = append(ups, mirror.Upstream{Proxy: proxy, Names: names, DockerHub: isDockerHub(sp.url), Policy: sp.policy})
		log.Info("upstream", "upstream", sp.name, "url", up.URL(), "aliases", strings.Join(names, ","),
			"auth", sp.auth != nil, "default", len(ups)-1 == def)
	}
	auth, err := loadAuth(c)
	if err != nil {
		return err
	}
	srv, err := mirror.New(mirror.Config{
		Store:      store,
		Upstreams:  ups,
		Default:    def,
		Logger:     log,
		Push:       pushes,
		Auth:       auth,
		OpenAdmin:  c.openAdmin,
		Fleet:      fleet,
		Fills:      fills,
		StoreStats: storeStats(store),
	})
	if err != nil {
		return err
	}
	if (c.tlsCert == "") != (c.tlsKey == "") {
		return errors.New("--tls-cert and --tls-key go together")
	}
	if c.tlsCert != "" {
		// Fail before listening, not in the serve goroutine.
		if _, err := tls.LoadX509KeyPair(c.tlsCert, c.tlsKey); err != nil {
			return fmt.Errorf("--tls-cert/--tls-key: %w", err)
		}
	}

	ln, err := net.Listen("tcp", c.listen)
	if err != nil {
		return err
	}
	// No ReadTimeout or WriteTimeout: a pull or push of a big blob may take
	// as long as it needs while it makes progress. Slow clients are bounded
	// by ReadHeaderTimeout (slowloris), stallGuard (trickled bodies) and
	// sendGuard (clients that stop reading).
	hs := &http.Server{
		Handler:           sendGuard(stallGuard(srv.Handler(), c.bodyStall), c.sendStall),
		ReadHeaderTimeout: c.readHeader,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 3)
	if c.tlsCert != "" {
		// ServeTLS turns HTTP/2 on by itself.
		go func() { errc <- hs.ServeTLS(ln, c.tlsCert, c.tlsKey) }()
	} else {
		go func() { errc <- hs.Serve(ln) }()
	}
	var ms *http.Server
	if c.metricsListen != "" {
		mln, err := net.Listen("tcp", c.metricsListen)
		if err != nil {
			hs.Close()
			return fmt.Errorf("--metrics-listen: %w", err)
		}
		ms = &http.Server{Handler: srv.MetricsHandler(), ReadHeaderTimeout: c.readHeader}
		go func() { errc <- ms.Serve(mln) }()
		log.Info("metrics serving", "addr", mln.Addr().String())
	}
	var ps *http.Server
	if fleet != nil {
		if ps, err = servePeers(c.fleet.peerListen, srv.PeerHandler(), log, errc); err != nil {
			hs.Close()
			return err
		}
		defer ps.Close()
	}
	log.Info("slipway serving", "addr", ln.Addr().String(), "data_dir", c.dataDir, "version", version,
		"tls", c.tlsCert != "", "auth", auth != nil)
	if ready != nil {
		ready <- ln.Addr().String()
	}

	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down")
	// /readyz says 503 first; then Shutdown closes the listener and waits
	// for responses in flight (fills they read from keep running until
	// fills.Close, deferred above).
	srv.Drain()
	sctx, cancel := context.WithTimeout(context.Background(), c.shutdownTimeout)
	defer cancel()
	if ms != nil {
		defer ms.Close()
	}
	if err := hs.Shutdown(sctx); err != nil {
		log.Warn("responses still in flight at shutdown deadline", "err", err)
		hs.Close()
	}
	return nil
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

// minBodyProgress is what a request body must bring in each
// --body-stall-timeout: 4 KiB a minute by default, 68 bytes a second,
// which any real client beats by far.
const minBodyProgress = 4 << 10

// stallGuard cuts off request bodies that trickle. A body must bring
// minBodyProgress bytes within every window (counted from the end of the
// headers, then from each time it did); otherwise its read fails, the
// handler's error answers, and the connection is closed. Unlike a
// ReadTimeout, a long push that keeps moving is never cut. window <= 0: off.
func stallGuard(h http.Handler, window time.Duration) http.Handler {
	if window <= 0 {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Body == nil || r.Body == http.NoBody {
			h.ServeHTTP(w, r)
			return
		}
		b := &stallReader{body: r.Body, rc: http.NewResponseController(w), window: window}
		if b.extend() == nil { // else the connection has no deadlines: serve as is
			r.Body = b
		}
		h.ServeHTTP(w, r)
	})
}

// stallReader is a request body that moves the connection's read deadline
// forward each time minBodyProgress more bytes arrived.
type stallReader struct {
	body   io.ReadCloser
	rc     *http.ResponseController
	window time.Duration
	got    int64 // bytes since the deadline last moved
}

func (s *stallReader) extend() error {
	s.got = 0
	return s.rc.SetReadDeadline(time.Now().Add(s.window))
}

func (s *stallReader) Read(p []byte) (int, error) {
	n, err := s.body.Read(p)
	s.got += int64(n)
	switch {
	case err == io.EOF:
		// The body is complete: no deadline while the handler works on it
		// (net/http reads the connection in the background from now on,
		// and a deadline there would cancel the request).
		s.rc.SetReadDeadline(time.Time{})
	case errors.Is(err, os.ErrDeadlineExceeded):
		err = fmt.Errorf("request body brought less than %d bytes in %s: %w", minBodyProgress, s.window, err)
	case err == nil && s.got >= minBodyProgress:
		s.extend()
	}
	return n, err
}

func (s *stallReader) Close() error { return s.body.Close() }

// sendPiece is what a client must take in of a response in each
// --send-stall-timeout: 256 KiB a minute by default, about 4 KiB a second.
const sendPiece = 256 << 10

// sendGuard drops clients that stop reading. With no WriteTimeout (a big
// pull may take as long as it needs), a client that opens a pull and never
// reads would hold its connection and goroutine for ever. Responses go out
// in pieces of sendPiece bytes, each with a write deadline window away, so
// a slow client that keeps reading is never cut. Blob bodies stay on
// sendfile: each piece is a file section. window <= 0: off.
func sendGuard(h http.Handler, window time.Duration) http.Handler {
	if window <= 0 {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := &stallWriter{ResponseWriter: w, rc: http.NewResponseController(w), window: window}
		if sw.extend() != nil { // the connection has no deadlines
			h.ServeHTTP(w, r)
			return
		}
		h.ServeHTTP(sw, r)
		// net/http flushes the last bytes after the handler returns: give
		// them a window too. Then it clears the deadline itself.
		sw.extend()
	})
}

type stallWriter struct {
	http.ResponseWriter
	rc     *http.ResponseController
	window time.Duration
}

func (s *stallWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

func (s *stallWriter) extend() error { return s.rc.SetWriteDeadline(time.Now().Add(s.window)) }

func (s *stallWriter) WriteHeader(code int) {
	s.extend()
	s.ResponseWriter.WriteHeader(code)
}

func (s *stallWriter) Write(p []byte) (int, error) {
	var n int
	for len(p) > 0 {
		s.extend()
		m, err := s.ResponseWriter.Write(p[:min(len(p), sendPiece)])
		n += m
		if err != nil {
			return n, err
		}
		p = p[m:]
	}
	return n, nil
}

// ReadFrom sends r in pieces through the ResponseWriter's own ReadFrom,
// which uses sendfile(2) when r is a file or a section of one.
func (s *stallWriter) ReadFrom(r io.Reader) (int64, error) {
	rf, ok := s.ResponseWriter.(io.ReaderFrom)
	if !ok {
		return io.CopyBuffer(struct{ io.Writer }{s}, r, make([]byte, 32<<10))
	}
	lr, ok := r.(*io.LimitedReader)
	if !ok {
		lr = &io.LimitedReader{R: r, N: math.MaxInt64}
	}
	var total int64
	for lr.N > 0 {
		s.extend()
		n, err := rf.ReadFrom(&io.LimitedReader{R: lr.R, N: min(lr.N, sendPiece)})
		lr.N -= n
		total += n
		if err != nil || n == 0 {
			return total, err
		}
	}
	return total, nil
}
