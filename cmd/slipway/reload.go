package main

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"slipway/cache"
	"slipway/mirror"
	"slipway/upstream"
)

// What a reload (SIGHUP) takes up without a restart: the config file's
// upstreams (with their credentials, policies and TTLs), the default
// upstream, the htpasswd file and the users' push prefixes, the TLS
// certificate and key, and the log level. These flags (or their config
// keys and environment twins) are read again with it; every other setting
// needs a restart, and a reload that finds one changed says so in the log
// and leaves it as it was.
var reloadable = map[string]bool{
	"upstream": true, "tag-ttl": true, "htpasswd": true, "anonymous-pull": true,
	"tls-cert": true, "tls-key": true, "log-level": true,
}

// reloader applies a re-read configuration to a running server: it builds
// everything first, and swaps it in only if all of it loads, so a broken
// file leaves the server as it was. Requests and fills in flight are not
// disturbed: a request keeps the routing it started with, a fill belongs
// to the filler, and an upstream whose settings did not change keeps its
// client (connections, tokens, rate-limit state) and its caches.
type reloader struct {
	cur       *serveConfig
	log       *slog.Logger
	srv       *mirror.Server
	upstreams *upstreamBuilder
	cert      *certFiles // nil: no TLS
}

func (r *reloader) reload() {
	err := r.apply()
	r.srv.NoteReload(err)
	if err != nil {
		r.log.Error("reload failed: the configuration in use stays", "err", err)
	}
}

func (r *reloader) apply() error {
	c, err := parseServe(r.cur.args, io.Discard)
	if err != nil {
		return err
	}
	for _, name := range changedFlags(r.cur, c) {
		if !reloadable[name] {
			r.log.Warn("reload: this setting needs a restart; the running value stays", "setting", name,
				"running", r.cur.values[name], "new", c.values[name])
		}
	}
	if (c.tlsCert == "") != (r.cert == nil) || (c.tlsCert == "") != (c.tlsKey == "") {
		return errors.New("turning TLS on or off needs a restart")
	}
	level, err := parseLevel(c.logLevel)
	if err != nil {
		return err
	}
	specs, def, err := upstreamSpecs(c)
	if err != nil {
		return err
	}
	ups, keep, err := r.upstreams.build(specs)
	if err != nil {
		return err
	}
	auth, err := loadAuth(c)
	if err != nil {
		return err
	}
	var cert *tls.Certificate
	if r.cert != nil {
		if cert, err = loadKeyPair(c.tlsCert, c.tlsKey); err != nil {
			return fmt.Errorf("--tls-cert/--tls-key: %w", err)
		}
	}
	if err := r.srv.Reload(ups, def, auth); err != nil {
		return err
	}
	keep()
	if r.cert != nil {
		r.cert.use(c.tlsCert, c.tlsKey, cert)
	}
	r.cur.level.Set(level)
	c.level = r.cur.level
	r.cur = c
	names := make([]string, len(specs))
	for i, sp := range specs {
		names[i] = sp.name
	}
	r.log.Info("reloaded", "upstreams", strings.Join(names, ","), "default", names[def], "auth", auth != nil,
		"users", usersOf(auth), "tls", r.cert != nil)
	return nil
}

func usersOf(a *mirror.Auth) int {
	if a == nil {
		return 0
	}
	return a.Users()
}

// changedFlags lists the settings whose values differ between a and b.
func changedFlags(a, b *serveConfig) []string {
	var out []string
	for name, v := range b.values {
		if a.values[name] != v {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// flagValues records every setting's value once it is parsed, to tell
// what a reload changed.
func flagValues(fs *flag.FlagSet) map[string]string {
	m := map[string]string{}
	fs.VisitAll(func(f *flag.Flag) { m[f.Name] = f.Value.String() })
	return m
}

// upstreamBuilder makes the upstreams' clients and proxies, and hands back
// the ones it made before for an upstream whose settings are the same, so
// that a reload keeps their connections, tokens, rate-limit state and
// negative caches.
type upstreamBuilder struct {
	store *cache.Store
	fills *upstream.Filler
	fleet *upstream.Fleet
	log   *slog.Logger
	obs   upstream.Observer // nil: none

	mu      sync.Mutex
	proxies map[string]*upstream.Proxy // by proxyKey
}

// build makes specs' upstreams. keep makes them the ones a later build
// reuses: call it once they are in use.
func (b *upstreamBuilder) build(specs []upstreamSpec) (ups []mirror.Upstream, keep func(), err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	clients := map[string]*upstream.Client{}
	for k, p := range b.proxies {
		ck, _, _ := strings.Cut(k, "\x01")
		clients[ck] = p.Upstream()
	}
	next := map[string]*upstream.Proxy{}
	for _, sp := range specs {
		ck, pk := sp.keys()
		p := b.proxies[pk]
		if p == nil {
			p = next[pk]
		}
		if p == nil {
			up := clients[ck]
			if up == nil {
				up, err = upstream.New(upstream.Config{URL: sp.url, Auth: sp.auth, AllowPrivate: sp.allowPrivate,
					MaxConcurrent: sp.maxConc, Logger: b.log, Observer: b.obs})
				if err != nil {
					return nil, nil, fmt.Errorf("upstream %q: %w", sp.name, err)
				}
				clients[ck] = up
			}
			p = upstream.NewProxy(up, b.store, b.fills, upstream.ProxyOptions{Logger: b.log, TagTTL: sp.tagTTL,
				NegativeTTL: sp.negativeTTL, StaleOn404: sp.staleOn404, Fleet: b.fleet})
		}
		next[pk] = p
		names := append([]string{}, sp.aliases...)
		if !strings.Contains(sp.name, "/") {
			names = append(names, sp.name)
		}
		ups = append(ups, mirror.Upstream{Proxy: p, Name: sp.name, Names: names, DockerHub: isDockerHub(sp.url), Policy: sp.policy})
	}
	return ups, func() {
		b.mu.Lock()
		b.proxies = next
		b.mu.Unlock()
	}, nil
}

// keys name what an upstream's client depends on (its URL, credentials,
// private-address permission, concurrency) and what its proxy does too
// (TTLs, stale-on-404). Credentials enter only as a hash.
func (sp upstreamSpec) keys() (client, proxy string) {
	h := sha256.Sum256([]byte(sp.credentials))
	client = fmt.Sprintf("%s|%s|%t|%d", sp.url, hex.EncodeToString(h[:8]), sp.allowPrivate, sp.maxConc)
	return client, fmt.Sprintf("%s\x01%s|%s|%t", client, sp.tagTTL, sp.negativeTTL, sp.staleOn404)
}

// certFiles serves the certificate in --tls-cert and --tls-key, and a
// renewed one as soon as the files change: cert-manager and ACME clients
// rewrite them in place, and send no signal. A handshake looks at the
// files at most once a second; a SIGHUP reloads them at once. Files that
// do not load (a certificate written before its key) leave the last good
// pair in use, and are tried again when they change.
type certFiles struct {
	log      *slog.Logger
	noteLoad func(error)

	mu               sync.Mutex
	certPath, keyPth string
	cert             *tls.Certificate
	stamp            string // the files as they were when cert, or a failure, was read
	checked          time.Time
}

func loadCertFiles(certPath, keyPath string, log *slog.Logger, noteLoad func(error)) (*certFiles, error) {
	cert, err := loadKeyPair(certPath, keyPath)
	if err != nil {
		return nil, err
	}
	cf := &certFiles{log: log, noteLoad: noteLoad}
	cf.use(certPath, keyPath, cert)
	return cf, nil
}

func loadKeyPair(certPath, keyPath string) (*tls.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return nil, err
	}
	return &cert, nil
}

// use serves cert, read from these files, from now on.
func (cf *certFiles) use(certPath, keyPath string, cert *tls.Certificate) {
	cf.mu.Lock()
	defer cf.mu.Unlock()
	cf.certPath, cf.keyPth, cf.cert = certPath, keyPath, cert
	cf.stamp, cf.checked = fileStamp(certPath, keyPath), time.Now()
}

// get is tls.Config.GetCertificate.
func (cf *certFiles) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	cf.mu.Lock()
	defer cf.mu.Unlock()
	if time.Since(cf.checked) < time.Second {
		return cf.cert, nil
	}
	cf.checked = time.Now()
	stamp := fileStamp(cf.certPath, cf.keyPth)
	if stamp == cf.stamp {
		return cf.cert, nil
	}
	cf.stamp = stamp
	cert, err := loadKeyPair(cf.certPath, cf.keyPth)
	cf.noteLoad(err)
	if err != nil {
		cf.log.Error("the TLS certificate files changed but do not load: the certificate in use stays", "err", err)
		return cf.cert, nil
	}
	cf.cert = cert
	cf.log.Info("serving the renewed TLS certificate", "cert", cf.certPath, "not_after", cert.Leaf.NotAfter)
	return cf.cert, nil
}

// fileStamp tells whether files changed: their sizes and modification
// times (of what a symlink points to, as Kubernetes swaps secret volumes).
func fileStamp(paths ...string) string {
	var b strings.Builder
	for _, p := range paths {
		fi, err := os.Stat(p)
		if err != nil {
			fmt.Fprintf(&b, "%s: missing;", p)
			continue
		}
		fmt.Fprintf(&b, "%s:%d:%d;", p, fi.Size(), fi.ModTime().UnixNano())
	}
	return b.String()
}
