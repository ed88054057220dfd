package mirror

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/labstack/echo/v4"

	"slipway/cache"
	"slipway/push"
	"slipway/upstream"
)

// Reads of local (pushed) repositories, and the listings: tags, referrers,
// catalog. A local repository is served from the store; the upstream is
// never asked about it.

// sourceLocal marks, in the request log, an answer from a local repository.
const sourceLocal upstream.Source = "local"

// setLocal records that a local repository answered, for the log line and
// metrics (unlike setSource, it sends no X-Slipway-Cache).
func setLocal(c echo.Context) {
	rq := requestOf(c)
	rq.src, rq.hasSrc = sourceLocal, true
}

// getLocalManifest serves (GET) or describes (HEAD) a pushed manifest.
func (s *Server) getLocalManifest(c echo.Context, repo string, r route) error {
	m, err := s.push.Manifest(repo, r.ref)
	if err != nil {
		return err
	}
	setLocal(c)
	return writeManifest(c, m)
}

// getLocalBlob serves a pushed blob through http.ServeContent. In a
// fleet, one this replica does not hold is streamed from the shared tier
// while it is copied here.
func (s *Server) getLocalBlob(c echo.Context, repo string, r route) error {
	f, _, err := s.push.Blob(repo, r.digest)
	if errors.Is(err, push.ErrBlobNotHere) && s.fills != nil {
		fetch := func() (*upstream.Blob, error) { return s.fills.FetchShared(c.Request().Context(), r.digest) }
		b, err := fetch()
		if err != nil {
			return err
		}
		setLocal(c)
		return serveBlob(c, r.digest, b, fetch)
	}
	if err != nil {
		return err
	}
	defer f.Close()
	setLocal(c)
	serveBlobFile(c, r.digest, f)
	return nil
}

// headLocalBlob says whether a local repository has a blob, and its size.
func (s *Server) headLocalBlob(c echo.Context, repo string, r route) error {
	info, err := s.push.StatBlob(repo, r.digest)
	if err != nil {
		return err
	}
	setLocal(c)
	setDescriptorHeaders(c.Response().Header(), r.digest, info.Size, "application/octet-stream")
	return c.NoContent(http.StatusOK)
}

// getTags lists a repository's tags, n at a time after last, with a Link
// header to the next page. A proxied repository's list is the upstream's,
// kept and served stale when the upstream fails (upstream.Proxy.Tags); the
// paging is always slipway's own, whatever the upstream does with n and
// last, and tags the pull-through policy denies are not listed.
// https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-tags
func (s *Server) getTags(c echo.Context, r route) error {
	n, last, err := pageParams(c)
	if err != nil {
		return err
	}
	t, err := s.resolve(c, r)
	if err != nil {
		return err
	}
	var tags []string
	if t.local {
		tags, err = s.push.Tags(t.repo, last, pageFetch(n))
	} else {
		var src upstream.Source
		tags, src, err = t.up.Proxy.Tags(c.Request().Context(), t.repo)
		setSource(c, src)
		tags = page(slices.DeleteFunc(tags, func(tag string) bool { return s.permit(t, tag) != nil }), last, pageFetch(n))
	}
	if err != nil {
		return err
	}
	tags = s.setNextLink(c, "/v2/"+r.name+"/tags/list", tags, n)
	return c.JSON(http.StatusOK, struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}{r.name, tags})
}

// page is the part of sorted list after last, at most n entries (n < 0:
// all).
func page(list []string, last string, n int) []string {
	if last != "" {
		i, found := slices.BinarySearch(list, last)
		if found {
			i++
		}
		list = list[i:]
	}
	if n >= 0 && len(list) > n {
		list = list[:n]
	}
	return list
}

// getCatalog lists the local repositories, n at a time after last, with a
// Link header to the next page. Proxied repositories are not listed.
// https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-repositories
func (s *Server) getCatalog(c echo.Context, r route) error {
	n, last, err := pageParams(c)
	if err != nil {
		return err
	}
	repos := []string{}
	if s.push != nil {
		if repos, err = s.push.Repositories(last, pageFetch(n)); err != nil {
			return err
		}
		repos = s.setNextLink(c, "/v2/_catalog", repos, n)
	}
	return c.JSON(http.StatusOK, struct {
		Repositories []string `json:"repositories"`
	}{repos})
}

// getReferrers lists the manifests whose subject is the digest, filtered
// by ?artifactType=: those pushed to a local repository, or for a proxied
// one what the upstream says (its referrers API, else the referrers tag
// schema), kept and served stale like a tag. Always an image index, empty
// when nothing refers to the digest: the spec forbids a 404 here.
// https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-referrers
func (s *Server) getReferrers(c echo.Context, r route) error {
	t, err := s.resolve(c, r)
	if err != nil {
		return err
	}
	at := c.QueryParam("artifactType")
	var idx v1.IndexManifest
	if t.local {
		idx, err = s.push.Referrers(t.repo, r.digest, at)
	} else {
		var descs []v1.Descriptor
		var src upstream.Source
		descs, src, err = t.up.Proxy.Referrers(c.Request().Context(), t.repo, r.digest)
		setSource(c, src)
		idx = cache.ReferrersIndex(descs, at)
	}
	if err != nil {
		return err
	}
	if at != "" {
		c.Response().Header().Set("OCI-Filters-Applied", "artifactType")
	}
	c.Response().Header().Set(echo.HeaderContentType, string(idx.MediaType))
	return c.JSON(http.StatusOK, idx)
}

// pageParams reads ?n= (-1 when absent or empty: everything) and ?last=. An n that
// is not a whole number, or is negative, is PAGINATION_NUMBER_INVALID, as
// distribution answers.
func pageParams(c echo.Context) (int, string, error) {
	q := c.QueryParams()
	if q.Get("n") == "" {
		return -1, q.Get("last"), nil
	}
	n, err := strconv.Atoi(q.Get("n"))
	if err != nil || n < 0 {
		return 0, "", newError(codePaginationInvalid, fmt.Sprintf("n=%.32q: want a whole number, 0 or more", q.Get("n")))
	}
	return n, q.Get("last"), nil
}

// pageFetch is how many entries to ask for: one more than a page, to know
// whether there is a next one.
func pageFetch(n int) int {
	if n <= 0 {
		return n
	}
	return n + 1
}

// setNextLink cuts list to a page of n and, if more follow, sets the Link
// header to the next page.
func (s *Server) setNextLink(c echo.Context, path string, list []string, n int) []string {
	if n <= 0 || len(list) <= n {
		return list
	}
	list = list[:n]
	q := url.Values{"n": {strconv.Itoa(n)}, "last": {list[n-1]}}
	c.Response().Header().Set("Link", "<"+path+"?"+q.Encode()+`>; rel="next"`)
	return list
}
