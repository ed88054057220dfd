package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"slipway/cache"
	"slipway/mirror"
	"slipway/push"
	"slipway/upstream"
)

// serveUntil runs the mirror until ctx is done, then shuts down in order:
// stop HTTP (letting responses in flight finish), stop the upload reaper,
// cancel and wait for fills, close the store. Each value on reload re-reads
// the configuration (see reloader). ready, if not nil, receives the
// listening address.
func serveUntil(ctx context.Context, c *serveConfig, log *slog.Logger, reload <-chan struct{}, ready chan<- string) error {
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

	// The Observer the fills and upstream clients report their timings to;
	// the server registers it.
	obs := mirror.NewObserver()
	fills := upstream.NewFiller(store, upstream.FillerOptions{Logger: log, Timeout: c.fillTimeout, IdleTimeout: c.fillIdle, Fleet: fleet, Observer: obs})
	defer fills.Close()
	// Without --push, what was pushed before is still served.
	pushes, err := push.New(push.Config{Store: store, Logger: log, Prefixes: splitList(c.pushPrefix),
		UploadTTL: c.uploadTTL, ReadOnly: !c.push})
	if err != nil {
		return err
	}
	defer pushes.Close()
	builder := &upstreamBuilder{store: store, fills: fills, fleet: fleet, log: log, obs: obs}
	specs, def, err := upstreamSpecs(c)
	if err != nil {
		return err
	}
	ups, keep, err := builder.build(specs)
	if err != nil {
		return err
	}
	keep()
	for i, sp := range specs {
		log.Info("upstream", "upstream", sp.name, "url", ups[i].Proxy.Upstream().URL(), "aliases", strings.Join(ups[i].Names, ","),
			"auth", sp.auth != nil, "default", i == def)
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
		Observer:   obs,
	})
	if err != nil {
		return err
	}
	defer srv.Close() // its prefetch jobs, before the fills they read
	if (c.tlsCert == "") != (c.tlsKey == "") {
		return errors.New("--tls-cert and --tls-key go together")
	}
	var cert *certFiles
	if c.tlsCert != "" {
		// Fail before listening, not in the serve goroutine.
		if cert, err = loadCertFiles(c.tlsCert, c.tlsKey, log, srv.NoteReload); err != nil {
			return fmt.Errorf("--tls-cert/--tls-key: %w", err)
		}
	}
	rl := &reloader{cur: c, log: log, srv: srv, upstreams: builder, cert: cert}

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
	if cert != nil {
		// Each new connection gets the certificate in the files now; ServeTLS
		// turns HTTP/2 on by itself.
		hs.TLSConfig = &tls.Config{GetCertificate: cert.get, MinVersion: tls.VersionTLS12}
		go func() { errc <- hs.ServeTLS(ln, "", "") }()
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

	for done := false; !done; {
		select {
		case err := <-errc:
			return err
		case <-reload:
			rl.reload()
		case <-ctx.Done():
			done = true
		}
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
