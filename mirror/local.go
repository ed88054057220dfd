package mirror

import (
	"net/http"
	"net/url"
	"strconv"

	"github.com/labstack/echo/v4"

	"slipway/upstream"
)

// Reads of local (pushed) repositories, and the listings: tags, referrers,
// catalog. A local repository is served from the store; the upstream is
// never asked about it.

// sourceLocal marks, in the request log, an answer from a local repository.
const sourceLocal upstream.Source = "local"

// getLocalManifest serves (GET) or describes (HEAD) a pushed manifest.
func (s *Server) getLocalManifest(c echo.Context, repo string, r route) error {
	m, err := s.push.Manifest(repo, r.ref)
	if err != nil {
		return err
	}
	c.Set(ctxSource, sourceLocal)
	return writeManifest(c, m)
}

// getLocalBlob serves a pushed blob through http.ServeContent.
func (s *Server) getLocalBlob(c echo.Context, repo string, r route) error {
	f, _, err := s.push.Blob(repo, r.digest)
	if err != nil {
		return err
	}
	defer f.Close()
	c.Set(ctxSource, sourceLocal)
	serveBlobFile(c, r.digest, f)
	return nil
}

// headLocalBlob says whether a local repository has a blob, and its size.
func (s *Server) headLocalBlob(c echo.Context, repo string, r route) error {
	info, err := s.push.StatBlob(repo, r.digest)
	if err != nil {
		return err
	}
	c.Set(ctxSource, sourceLocal)
	setDescriptorHeaders(c.Response().Header(), r.digest, info.Size, "application/octet-stream")
	return c.NoContent(http.StatusOK)
}

// getTags lists a local repository's tags, n at a time after last, with a
// Link header to the next page.
// https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-tags
func (s *Server) getTags(c echo.Context, r route) error {
	t, err := s.resolve(c, r.name)
	if err != nil {
		return err
	}
	n, last := pageParams(c)
	var tags []string
	if t.local {
		tags, err = s.push.Tags(t.repo, last, pageFetch(n))
	} else {
		tags, err = t.up.Proxy.Tags(c.Request().Context(), t.repo, pageFetch(n), last)
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

// getCatalog lists the local repositories, n at a time after last, with a
// Link header to the next page. Proxied repositories are not listed.
// https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-repositories
func (s *Server) getCatalog(c echo.Context, r route) error {
	repos := []string{}
	if s.push != nil {
		n, last := pageParams(c)
		var err error
		if repos, err = s.push.Repositories(last, pageFetch(n)); err != nil {
			return err
		}
		repos = s.setNextLink(c, "/v2/_catalog", repos, n)
	}
	return c.JSON(http.StatusOK, struct {
		Repositories []string `json:"repositories"`
	}{repos})
}

// getReferrers lists the manifests of a local repository whose subject is
// the digest, filtered by ?artifactType=. For a proxied repository it is
// 404, so that clients fall back to the referrers tag schema, which is
// served through the cache like any tag.
// https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-referrers
func (s *Server) getReferrers(c echo.Context, r route) error {
	t, err := s.resolve(c, r.name)
	if err != nil {
		return err
	}
	if !t.local {
		return newError(codeManifestUnknown, "the referrers API is not proxied; use the referrers tag schema")
	}
	at := c.QueryParam("artifactType")
	idx, err := s.push.Referrers(t.repo, r.digest, at)
	if err != nil {
		return err
	}
	if at != "" {
		c.Response().Header().Set("OCI-Filters-Applied", "artifactType")
	}
	c.Response().Header().Set(echo.HeaderContentType, string(idx.MediaType))
	return c.JSON(http.StatusOK, idx)
}

// pageParams reads ?n= (-1 when absent or not a number: everything) and
// ?last=.
func pageParams(c echo.Context) (int, string) {
	n, err := strconv.Atoi(c.QueryParam("n"))
	if err != nil || n < 0 {
		n = -1
	}
	return n, c.QueryParam("last")
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
