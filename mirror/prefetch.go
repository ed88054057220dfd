package mirror

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/labstack/echo/v4"
	"github.com/opencontainers/go-digest"

	"slipway/upstream"
)

// PrefetchRequest is the body of POST /v2/_slipway/prefetch.
type PrefetchRequest struct {
	// Images as a client would name them to this mirror (ParseImage):
	// "alpine:3.20", "ghcr.io/org/app:v1" (an upstream prefix),
	// "team/app@sha256:...", "alpine:3.20@sha256:...",
	// "localhost:5000/x:y" (the upstream of that host).
	Images []string `json:"images"`
	// Platform ("linux/amd64") limits an index to one platform; empty: all.
	Platform string `json:"platform,omitempty"`
}

// PrefetchResult is one image's outcome.
type PrefetchResult struct {
	Image     string `json:"image"`
	Manifests int    `json:"manifests"`
	Blobs     int    `json:"blobs"`
	Cached    int    `json:"cached"`  // manifests and blobs that were in the cache already
	Fetched   int    `json:"fetched"` // manifests and blobs fetched from the upstream now
	Bytes     int64  `json:"bytes"`   // blob bytes fetched from the upstream
	Error     string `json:"error,omitempty"`
}

// One prefetch call: at most maxPrefetchImages images (its body is at most
// 1 MiB), worked on by at most prefetchWorkers goroutines.
const (
	maxPrefetchImages = 256
	prefetchWorkers   = 4
)

// postPrefetch warms the cache with whole images (every platform of an
// index unless one is asked for), for CI pipelines: it answers when all
// are stored, 200 if every image was, else 502 with the same body.
func (s *Server) postPrefetch(c echo.Context) error {
	req, refs, plat, err := readPrefetch(c, "call")
	if err != nil {
		return err
	}
	ns := nsParam(c) // echo.Context is not for other goroutines
	// The work is the server's, not the client's: a CI job that gives up
	// still leaves the fills running to completion.
	ctx := context.WithoutCancel(c.Request().Context())
	results := make([]PrefetchResult, len(req.Images))
	s.prefetchAll(ctx, ns, req.Images, refs, plat, nil, func(i int, r PrefetchResult) { results[i] = r })
	status := http.StatusOK
	for _, r := range results {
		if r.Error != "" {
			status = http.StatusBadGateway
		}
	}
	return c.JSON(status, map[string]any{"results": results})
}

// readPrefetch reads and checks a prefetch body (what is "a call" or "a
// job"). Every reference is checked before any work: one that does not
// parse fails the whole request (400), as a bad name fails a pull.
func readPrefetch(c echo.Context, what string) (PrefetchRequest, []ImageRef, *v1.Platform, error) {
	var req PrefetchRequest
	body, err := io.ReadAll(io.LimitReader(c.Request().Body, 1<<20))
	if err != nil {
		return req, nil, nil, err
	}
	if err := json.Unmarshal(body, &req); err != nil || len(req.Images) == 0 {
		return req, nil, nil, newError(codeAdminInvalid, `want {"images": ["name:tag", ...], "platform": "os/arch"}`)
	}
	if len(req.Images) > maxPrefetchImages {
		return req, nil, nil, newError(codeAdminInvalid, fmt.Sprintf("%d images: at most %d in one %s", len(req.Images), maxPrefetchImages, what))
	}
	var plat *v1.Platform
	if req.Platform != "" {
		if plat, err = v1.ParsePlatform(req.Platform); err != nil {
			return req, nil, nil, newError(codeAdminInvalid, "platform: "+err.Error())
		}
	}
	ns := nsParam(c)
	refs := make([]ImageRef, len(req.Images))
	for i, image := range req.Images {
		r, err := ParseImage(image)
		if err != nil {
			return req, nil, nil, err
		}
		if r.NS != "" && ns != "" && !strings.EqualFold(r.NS, ns) {
			return req, nil, nil, newError(codeNameInvalid, fmt.Sprintf("image %q names the upstream %q, ?ns= names %q", image, r.NS, ns))
		}
		refs[i] = r
	}
	return req, refs, plat, nil
}

// prefetchAll prefetches images with at most prefetchWorkers goroutines,
// and hands each result to done (from the goroutine that got it). progress,
// if not nil, gives the progress record of image i.
func (s *Server) prefetchAll(ctx context.Context, ns string, images []string, refs []ImageRef, plat *v1.Platform,
	progress func(i int) *prefetchProgress, done func(i int, r PrefetchResult)) {
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(prefetchWorkers, len(images)) {
		wg.Go(func() {
			for i := range next {
				var pr *prefetchProgress
				if progress != nil {
					pr = progress(i)
				}
				done(i, s.prefetch(ctx, ns, images[i], refs[i], plat, pr))
			}
		})
	}
	for i := range images {
		next <- i
	}
	close(next)
	wg.Wait()
}

// prefetch stores one image through the proxy, as a pull would. pr, if not
// nil, follows its progress as it goes.
func (s *Server) prefetch(ctx context.Context, ns, image string, img ImageRef, plat *v1.Platform, pr *prefetchProgress) PrefetchResult {
	res := PrefetchResult{Image: image}
	fail := func(err error) PrefetchResult {
		res.Error = err.Error()
		return res
	}
	if img.NS != "" {
		ns = img.NS
	}
	t, err := s.resolveNS(ns, img.Name)
	if err != nil {
		return fail(err)
	}
	ref, tag := img.Ref, img.Ref
	if strings.Contains(ref, ":") {
		tag = ""
	}
	if err := s.permit(t, tag); err != nil {
		return fail(err)
	}
	if t.local {
		return fail(fmt.Errorf("%s is a local repository: nothing to prefetch", img.Name))
	}
	p := t.up.Proxy
	note := func(src upstream.Source) {
		switch src {
		case upstream.SourceMiss, upstream.SourceJoined:
			res.Fetched++
		default:
			res.Cached++
		}
		pr.noted(src)
	}
	m, src, err := p.Manifest(ctx, t.repo, ref, nil)
	if err != nil {
		return fail(err)
	}
	res.Manifests++
	note(src)
	images := []digest.Digest{}
	top := m.Bytes
	if idx, err := v1.ParseIndexManifest(bytes.NewReader(top)); err == nil && len(idx.Manifests) > 0 && isIndex(m.MediaType, idx) {
		for _, d := range idx.Manifests {
			if plat != nil && (d.Platform == nil || !d.Platform.Satisfies(*plat)) {
				continue
			}
			images = append(images, digest.Digest(d.Digest.String()))
		}
		if len(images) == 0 {
			return fail(fmt.Errorf("the index has no manifest for platform %s", plat))
		}
	} else {
		images = append(images, "")
	}
	for _, d := range images {
		mb := top
		if d != "" {
			im, src, err := p.Manifest(ctx, t.repo, string(d), nil)
			if err != nil {
				return fail(err)
			}
			res.Manifests++
			note(src)
			mb = im.Bytes
		}
		man, err := v1.ParseManifest(bytes.NewReader(mb))
		if err != nil {
			return fail(fmt.Errorf("manifest: %w", err))
		}
		blobs := append([]v1.Descriptor{man.Config}, man.Layers...)
		pr.expect(blobs)
		for _, bd := range blobs {
			if bd.Digest.Hex == "" {
				continue
			}
			b, err := p.Blob(ctx, t.repo, digest.Digest(bd.Digest.String()))
			if err != nil {
				return fail(err)
			}
			res.Blobs++
			note(b.Source)
			if b.Reader != nil {
				n, err := io.Copy(pr.sink(), b.Reader)
				res.Bytes += n
				if err != nil {
					b.Close()
					return fail(err)
				}
			}
			b.Close()
			pr.blobDone()
		}
	}
	return res
}

func isIndex(mediaType string, idx *v1.IndexManifest) bool {
	return strings.Contains(mediaType, "index") || strings.Contains(mediaType, "manifest.list") ||
		strings.Contains(string(idx.MediaType), "index") || strings.Contains(string(idx.MediaType), "manifest.list")
}
