package mirror

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"

	"github.com/labstack/echo/v4"
	"github.com/opencontainers/go-digest"

	"slipway/push"
)

// The push side of the API: uploads, manifest PUT, deletes. Writes go only
// to local repositories (resolveWrite); the handlers parse HTTP and call
// push.Manager.

var (
	errPushDisabled   = newError(codeUnsupported, "pushes are disabled on this mirror")
	errRangeMalformed = newError(codeBlobUploadInvalid, "Content-Range must be <start>-<end>")
	errRangeLength    = newError(codeRangeInvalid, "Content-Range and Content-Length disagree")
	errDigestMissing  = newError(codeDigestInvalid, "the digest query parameter is required to finish an upload")
)

// resolveWrite returns the local repository a write to name goes to, or
// refuses it: a push never goes to a proxied name, so it can never change
// what a client gets for an upstream image.
func (s *Server) resolveWrite(c echo.Context, name string) (string, error) {
	if s.push == nil || s.push.ReadOnly() {
		return "", errPushDisabled
	}
	if ns := nsParam(c); ns != "" {
		return "", newError(codeDenied, fmt.Sprintf("?ns=%s names an upstream; pushes go only to local repositories", ns))
	}
	rt := s.routing.Load()
	if first, _, ok := strings.Cut(name, "/"); ok {
		if _, ok := rt.byName[first]; ok {
			return "", newError(codeDenied, fmt.Sprintf("%q names an upstream; pushes go only to local repositories", first))
		}
	}
	if !s.push.Permits(name) {
		return "", newError(codeDenied, fmt.Sprintf("%q matches none of the push prefixes", name))
	}
	local, err := s.push.Exists(name)
	if err != nil || local || rt.def == nil {
		return name, err
	}
	// Not local yet: refuse a name whose upstream image was pulled through,
	// since pushing would shadow it.
	t, err := s.targetOf(rt.def, name)
	if err != nil {
		return name, nil
	}
	host := rt.def.Proxy.Upstream().Host()
	if proxied, err := s.store.HasContent(host, t.repo); err != nil {
		return "", err
	} else if proxied {
		return "", newError(codeDenied, fmt.Sprintf("%q is proxied from %s; pushes go only to local repositories", name, host))
	}
	return name, nil
}

// postUpload starts an upload (202), stores a blob sent whole with
// ?digest= (201), or mounts one from another repository with
// ?mount=<digest>&from=<repo> (201, else an upload is started: 202).
// https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pushing-blobs
func (s *Server) postUpload(c echo.Context, r route) error {
	repo, err := s.resolveWrite(c, r.name)
	if err != nil {
		return err
	}
	q := c.Request().URL.Query()
	if m := q.Get("mount"); m != "" {
		d, err := parseDigest(m)
		if err != nil {
			return err
		}
		var from *push.Source
		if f := q.Get("from"); f != "" {
			from = s.mountSource(c, f)
		}
		if from != nil || q.Get("from") == "" {
			ok, err := s.push.Mount(repo, d, from)
			if err != nil {
				return err
			}
			if ok {
				return blobCreated(c, r.name, d)
			}
		}
	} else if dg := q.Get("digest"); dg != "" {
		d, err := parseDigest(dg)
		if err != nil {
			return err
		}
		if _, err := s.push.PutBlob(repo, d, c.Request().Body, c.Request().ContentLength); err != nil {
			return err
		}
		return blobCreated(c, r.name, d)
	}
	u, err := s.push.StartUpload(repo)
	if err != nil {
		return err
	}
	setUploadHeaders(c, r.name, u)
	return c.NoContent(http.StatusAccepted)
}

// mountSource resolves a mount's from= like a read of that name would; nil
// if it names nothing a mount can read.
func (s *Server) mountSource(c echo.Context, from string) *push.Source {
	if validateName(from) != nil {
		return nil
	}
	t, err := s.resolveNS(nsParam(c), from)
	if err != nil || s.permit(t, "") != nil {
		return nil
	}
	if t.local {
		return &push.Source{Repo: t.repo}
	}
	return &push.Source{NS: t.up.Proxy.Upstream().Host(), Repo: t.repo}
}

// patchUpload appends a chunk to an upload: with Content-Range it must
// start where the upload ends (else 416); without, it is appended (a
// streamed upload).
// https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pushing-a-blob-in-chunks
func (s *Server) patchUpload(c echo.Context, r route) error {
	repo, err := s.resolveWrite(c, r.name)
	if err != nil {
		return err
	}
	start, length, err := chunkRange(c.Request())
	if err != nil {
		return s.uploadError(c, r, repo, err)
	}
	u, err := s.push.WriteUpload(repo, r.upload, c.Request().Body, start, length)
	if err != nil {
		return s.uploadError(c, r, repo, err)
	}
	setUploadHeaders(c, r.name, u)
	return c.NoContent(http.StatusAccepted)
}

// uploadError returns err, with the upload's Location and Range set so a
// client can resume after a 416.
func (s *Server) uploadError(c echo.Context, r route, repo string, err error) error {
	if u, uerr := s.push.Upload(repo, r.upload); uerr == nil {
		setUploadHeaders(c, r.name, u)
	}
	return err
}

// putUpload finishes an upload, with an optional last chunk, as blob
// ?digest=. The bytes are verified against it (400 DIGEST_INVALID, nothing
// stored) and committed through the per-digest guard.
// https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pushing-a-blob-monolithically
func (s *Server) putUpload(c echo.Context, r route) error {
	repo, err := s.resolveWrite(c, r.name)
	if err != nil {
		return err
	}
	dg := c.QueryParam("digest")
	if dg == "" {
		return errDigestMissing
	}
	d, err := parseDigest(dg)
	if err != nil {
		return err
	}
	start, length, err := chunkRange(c.Request())
	if err != nil {
		return s.uploadError(c, r, repo, err)
	}
	if _, err := s.push.FinishUpload(repo, r.upload, d, c.Request().Body, start, length); err != nil {
		return s.uploadError(c, r, repo, err)
	}
	return blobCreated(c, r.name, d)
}

// getUpload reports how much of an upload the registry has (204, Range).
// https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pushing-a-blob-in-chunks
func (s *Server) getUpload(c echo.Context, r route) error {
	if s.push == nil || s.push.ReadOnly() {
		return errPushDisabled
	}
	u, err := s.push.Upload(r.name, r.upload)
	if err != nil {
		return err
	}
	setUploadHeaders(c, r.name, u)
	return c.NoContent(http.StatusNoContent)
}

// deleteUpload cancels an upload (204).
// https://github.com/opencontainers/distribution-spec/blob/main/spec.md#canceling-an-upload
func (s *Server) deleteUpload(c echo.Context, r route) error {
	repo, err := s.resolveWrite(c, r.name)
	if err != nil {
		return err
	}
	if err := s.push.CancelUpload(repo, r.upload); err != nil {
		return err
	}
	return c.NoContent(http.StatusNoContent)
}

// putManifest stores a manifest by tag or digest (and ?tag= tags). The body
// is read up to 4 MiB (413 beyond): the only route with a body limit. Never
// c.Bind: echo answers 415 for OCI media types, and the bytes must stay
// exactly as sent for their digest to hold.
// https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pushing-manifests
func (s *Server) putManifest(c echo.Context, r route) error {
	repo, err := s.resolveWrite(c, r.name)
	if err != nil {
		return err
	}
	tags := c.QueryParams()["tag"]
	for _, t := range tags {
		if !validTag(t) {
			return errTagInvalid
		}
	}
	req := c.Request()
	if req.ContentLength > push.MaxManifestSize {
		return fmt.Errorf("%w: %d bytes, the limit is %d", push.ErrManifestTooLarge, req.ContentLength, push.MaxManifestSize)
	}
	body, err := io.ReadAll(io.LimitReader(req.Body, push.MaxManifestSize+1))
	if err != nil {
		return err
	}
	p, err := s.push.PutManifest(repo, r.ref, tags, req.Header.Get(echo.HeaderContentType), body)
	if err != nil {
		return err
	}
	h := c.Response().Header()
	h.Set(echo.HeaderLocation, "/v2/"+r.name+"/manifests/"+string(p.Digest))
	h.Set("Docker-Content-Digest", string(p.Digest))
	if p.Subject != "" {
		h.Set("OCI-Subject", string(p.Subject))
	}
	for _, t := range tags {
		h.Add("OCI-Tag", t)
	}
	h.Set(echo.HeaderContentLength, "0")
	return c.NoContent(http.StatusCreated)
}

// deleteManifest removes a tag, or a manifest by digest (202).
// https://github.com/opencontainers/distribution-spec/blob/main/spec.md#deleting-tags
func (s *Server) deleteManifest(c echo.Context, r route) error {
	repo, err := s.resolveWrite(c, r.name)
	if err != nil {
		return err
	}
	if err := s.push.DeleteManifest(repo, r.ref); err != nil {
		return err
	}
	return c.NoContent(http.StatusAccepted)
}

// deleteBlob removes a blob from a repository (202).
// https://github.com/opencontainers/distribution-spec/blob/main/spec.md#deleting-blobs
func (s *Server) deleteBlob(c echo.Context, r route) error {
	repo, err := s.resolveWrite(c, r.name)
	if err != nil {
		return err
	}
	if err := s.push.DeleteBlob(repo, r.digest); err != nil {
		return err
	}
	return c.NoContent(http.StatusAccepted)
}

func setUploadHeaders(c echo.Context, name string, u push.Upload) {
	h := c.Response().Header()
	h.Set(echo.HeaderLocation, "/v2/"+name+"/blobs/uploads/"+u.ID)
	h.Set("Docker-Upload-UUID", u.ID)
	h.Set("Range", uploadRange(u.Size))
	h.Set(echo.HeaderContentLength, "0")
}

// uploadRange is the Range header of an upload of size bytes: the
// inclusive range received, "0-0" when nothing was (as distribution does).
func uploadRange(size int64) string {
	if size <= 0 {
		return "0-0"
	}
	return "0-" + strconv.FormatInt(size-1, 10)
}

func blobCreated(c echo.Context, name string, d digest.Digest) error {
	h := c.Response().Header()
	h.Set(echo.HeaderLocation, "/v2/"+name+"/blobs/"+string(d))
	h.Set("Docker-Content-Digest", string(d))
	h.Set(echo.HeaderContentLength, "0")
	return c.NoContent(http.StatusCreated)
}

// chunkRange reads a chunk's Content-Range ("<start>-<end>", inclusive; a
// "bytes " prefix and a "/<total>" suffix are tolerated) and its length.
// Without Content-Range, start is -1 (append) and length is Content-Length
// (-1 if unknown).
func chunkRange(req *http.Request) (start, length int64, err error) {
	h := req.Header.Get("Content-Range")
	if h == "" {
		return -1, req.ContentLength, nil
	}
	h = strings.TrimPrefix(strings.TrimSpace(h), "bytes ")
	h, _, _ = strings.Cut(h, "/")
	a, b, ok := strings.Cut(h, "-")
	if !ok {
		return 0, 0, errRangeMalformed
	}
	start, err1 := strconv.ParseInt(a, 10, 64)
	end, err2 := strconv.ParseInt(b, 10, 64)
	if err1 != nil || err2 != nil || start < 0 {
		return 0, 0, errRangeMalformed
	}
	if end < start {
		return 0, 0, newError(codeRangeInvalid, "Content-Range ends before it starts")
	}
	if end >= math.MaxInt64-1 {
		// end+1 would overflow; no upload is that big.
		return 0, 0, newError(codeRangeInvalid, "Content-Range is out of range")
	}
	length = end - start + 1
	if req.ContentLength >= 0 && req.ContentLength != length {
		return 0, 0, errRangeLength
	}
	return start, length, nil
}
