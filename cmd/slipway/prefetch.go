package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"slipway/mirror"
)

// prefetch pulls images through a running mirror so its cache holds them:
//
//	slipway prefetch [--server URL] [--platform os/arch] [--concurrency N] [-f FILE] IMAGE...
//
// Images are named as a client of the mirror names them ("alpine:3.20",
// "ghcr.io/org/app:v1" for a configured upstream prefix,
// "alpine:3.20@sha256:...", "localhost:5000/x:y" for the upstream of that
// host), read by mirror.ParseImage as POST /v2/_slipway/prefetch reads
// them. Every platform of an index is pulled unless --platform picks one.
func prefetch(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("prefetch", flag.ContinueOnError)
	fs.SetOutput(stderr)
	server := fs.String("server", envOr("SLIPWAY_SERVER", "http://localhost:5000"), "the mirror's URL (env SLIPWAY_SERVER)")
	platform := fs.String("platform", "", "pull only this platform of multi-platform images (os/arch[/variant]); empty: all")
	concurrency := fs.Int("concurrency", 4, "images pulled at the same time")
	file := fs.String("f", "", "file with one image per line (# comments); - is stdin")
	user := fs.String("username", os.Getenv("SLIPWAY_USERNAME"), "user name, when the mirror needs a login to pull (password: env SLIPWAY_PASSWORD)")
	fs.Usage = func() {
		fmt.Fprint(stderr, "Usage: slipway prefetch [flags] IMAGE...\n\nPulls images through a slipway mirror so its cache holds them.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	images := fs.Args()
	if *file != "" {
		more, err := readImageList(*file)
		if err != nil {
			fmt.Fprintln(stderr, "slipway prefetch:", err)
			return 2
		}
		images = append(images, more...)
	}
	if len(images) == 0 {
		fs.Usage()
		return 2
	}
	jobs := make([]*prefetchJob, len(images))
	bad := false
	for i, img := range images {
		ref, err := mirror.ParseImage(img)
		if err != nil {
			fmt.Fprintln(stderr, "slipway prefetch:", err)
			bad = true
		}
		jobs[i] = &prefetchJob{image: img, ref: ref}
	}
	if bad {
		return 2
	}
	p, err := newPrefetcher(*server, *platform, *user, os.Getenv("SLIPWAY_PASSWORD"))
	if err != nil {
		fmt.Fprintln(stderr, "slipway prefetch:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	start := time.Now()
	bars := newPrefetchProgress(stderr)
	var wg sync.WaitGroup
	sem := make(chan struct{}, max(*concurrency, 1))
	for _, j := range jobs {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			bars.started(j)
			j.err = p.pull(ctx, j)
			bars.finished(j)
		})
	}
	wg.Wait()
	bars.stop()

	var failed, allCached int
	var fetchedBytes int64
	for _, j := range jobs {
		switch {
		case j.err != nil:
			failed++
		case j.fetched.Load() == 0:
			allCached++
		}
		fetchedBytes += j.fetchedBytes.Load()
	}
	fmt.Fprintf(stdout, "prefetched %d of %d images in %s: %d were already cached, %s came from upstreams",
		len(jobs)-failed, len(jobs), time.Since(start).Round(time.Millisecond), allCached, sizeText(fetchedBytes))
	if failed > 0 {
		fmt.Fprintf(stdout, "; %d failed\n", failed)
		return 1
	}
	fmt.Fprintln(stdout)
	return 0
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func readImageList(path string) ([]string, error) {
	var r io.Reader = os.Stdin
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		r = f
	}
	var out []string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line, _, _ := strings.Cut(sc.Text(), "#")
		if line = strings.TrimSpace(line); line != "" {
			out = append(out, line)
		}
	}
	return out, sc.Err()
}

type prefetcher struct {
	host     string
	opts     []name.Option
	platform *v1.Platform
	auth     authn.Authenticator
	base     http.RoundTripper
}

func newPrefetcher(server, platform, user, pass string) (*prefetcher, error) {
	u, err := url.Parse(server)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("--server %q: want http(s)://host[:port]", server)
	}
	p := &prefetcher{host: u.Host, auth: authn.Anonymous, base: remote.DefaultTransport}
	if u.Scheme == "http" {
		p.opts = append(p.opts, name.Insecure)
	}
	if platform != "" {
		if p.platform, err = v1.ParsePlatform(platform); err != nil {
			return nil, fmt.Errorf("--platform: %w", err)
		}
	}
	if user != "" {
		p.auth = &authn.Basic{Username: user, Password: pass}
	}
	return p, nil
}

// prefetchJob is one image's progress, read by the progress display.
type prefetchJob struct {
	image        string
	ref          mirror.ImageRef
	total        atomic.Int64 // bytes of all blobs, once the manifests are read
	read         atomic.Int64
	blobs        atomic.Int64
	cached       atomic.Int64 // manifests and blobs the mirror had
	fetched      atomic.Int64 // manifests and blobs it fetched for us
	fetchedBytes atomic.Int64
	platforms    atomic.Int64
	err          error
}

// pull reads every manifest and blob of job's image through the mirror.
func (p *prefetcher) pull(ctx context.Context, job *prefetchJob) error {
	repo, err := name.NewRepository(p.host+"/"+job.ref.Name, p.opts...)
	if err != nil {
		return err
	}
	var ref name.Reference = repo.Tag(job.ref.Ref)
	if strings.Contains(job.ref.Ref, ":") {
		ref = repo.Digest(job.ref.Ref)
	}
	var rt http.RoundTripper = &cacheCounter{inner: p.base, job: job}
	if job.ref.NS != "" {
		rt = &nsTransport{inner: rt, ns: job.ref.NS}
	}
	ropts := []remote.Option{remote.WithContext(ctx), remote.WithAuth(p.auth), remote.WithTransport(rt)}
	desc, err := remote.Get(ref, ropts...)
	if err != nil {
		return err
	}
	var imgs []v1.Image
	if desc.MediaType.IsIndex() {
		idx, err := desc.ImageIndex()
		if err != nil {
			return err
		}
		im, err := idx.IndexManifest()
		if err != nil {
			return err
		}
		for _, m := range im.Manifests {
			if !m.MediaType.IsImage() {
				continue
			}
			if p.platform != nil && (m.Platform == nil || !m.Platform.Satisfies(*p.platform)) {
				continue
			}
			img, err := idx.Image(m.Digest)
			if err != nil {
				return err
			}
			imgs = append(imgs, img)
		}
		if len(imgs) == 0 {
			return fmt.Errorf("no image in the index matches the platform")
		}
	} else {
		img, err := desc.Image()
		if err != nil {
			return err
		}
		imgs = append(imgs, img)
	}
	job.platforms.Store(int64(len(imgs)))
	// Read every manifest first, so the bar knows the total.
	var layers []v1.Layer
	seen := map[v1.Hash]bool{}
	for _, img := range imgs {
		m, err := img.Manifest()
		if err != nil {
			return err
		}
		job.total.Add(m.Config.Size)
		ls, err := img.Layers()
		if err != nil {
			return err
		}
		for _, l := range ls {
			d, err := l.Digest()
			if err != nil {
				return err
			}
			if !seen[d] {
				seen[d] = true
				sz, _ := l.Size()
				job.total.Add(sz)
				layers = append(layers, l)
			}
		}
	}
	for _, img := range imgs {
		cfg, err := img.RawConfigFile()
		if err != nil {
			return err
		}
		job.read.Add(int64(len(cfg)))
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			return err
		}
		_, err = io.Copy(io.Discard, &countingReader{r: rc, n: &job.read})
		rc.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

// cacheCounter reads X-Slipway-Cache on the mirror's answers.
type cacheCounter struct {
	inner http.RoundTripper
	job   *prefetchJob
}

func (c *cacheCounter) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := c.inner.RoundTrip(req)
	if err != nil || req.Method != http.MethodGet || resp.StatusCode != http.StatusOK {
		return resp, err
	}
	isBlob := strings.Contains(req.URL.Path, "/blobs/")
	if isBlob {
		c.job.blobs.Add(1)
	}
	switch resp.Header.Get("X-Slipway-Cache") {
	case "":
	case "hit", "revalidated", "stale", "local":
		c.job.cached.Add(1)
	default:
		c.job.fetched.Add(1)
		if isBlob && resp.ContentLength > 0 {
			c.job.fetchedBytes.Add(resp.ContentLength)
		}
	}
	return resp, nil
}

// nsTransport names the upstream in ?ns= on every repository request, for
// an image whose registry is a host:port (a /v2/ path cannot carry one).
type nsTransport struct {
	inner http.RoundTripper
	ns    string
}

func (t *nsTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Path != "/v2/" {
		req = req.Clone(req.Context())
		q := req.URL.Query()
		q.Set("ns", t.ns)
		req.URL.RawQuery = q.Encode()
	}
	return t.inner.RoundTrip(req)
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

func (j *prefetchJob) summary() string {
	if j.err != nil {
		return fmt.Sprintf("%s: FAILED: %v", j.image, j.err)
	}
	plats := ""
	if n := j.platforms.Load(); n > 1 {
		plats = fmt.Sprintf("%d platforms, ", n)
	}
	if j.fetched.Load() == 0 {
		return fmt.Sprintf("%s: %s%d blobs, %s, all cached", j.image, plats, j.blobs.Load(), sizeText(j.total.Load()))
	}
	return fmt.Sprintf("%s: %s%d blobs, %s; fetched %d manifests and blobs (%s) from the upstream, %d were cached",
		j.image, plats, j.blobs.Load(), sizeText(j.total.Load()), j.fetched.Load(), sizeText(j.fetchedBytes.Load()), j.cached.Load())
}
