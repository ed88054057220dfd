package mirror

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/labstack/echo/v4"

	"slipway/cache"
	"slipway/push"
	"slipway/upstream"
)

// code is an OCI error code with the HTTP status the distribution spec
// gives it. Each is declared once, here.
type code struct {
	name   string
	status int
}

var (
	codeBlobUnknown         = code{"BLOB_UNKNOWN", http.StatusNotFound}
	codeBlobUploadInvalid   = code{"BLOB_UPLOAD_INVALID", http.StatusBadRequest}
	codeBlobUploadUnknown   = code{"BLOB_UPLOAD_UNKNOWN", http.StatusNotFound}
	codeDigestInvalid       = code{"DIGEST_INVALID", http.StatusBadRequest}
	codeManifestBlobUnknown = code{"MANIFEST_BLOB_UNKNOWN", http.StatusBadRequest}
	codeManifestInvalid     = code{"MANIFEST_INVALID", http.StatusBadRequest}
	codeManifestUnknown     = code{"MANIFEST_UNKNOWN", http.StatusNotFound}
	codeNameInvalid         = code{"NAME_INVALID", http.StatusBadRequest}
	codeNameUnknown         = code{"NAME_UNKNOWN", http.StatusNotFound}
	codeSizeInvalid         = code{"SIZE_INVALID", http.StatusBadRequest}
	codeTagInvalid          = code{"TAG_INVALID", http.StatusBadRequest}
	codeUnauthorized        = code{"UNAUTHORIZED", http.StatusUnauthorized}
	codeDenied              = code{"DENIED", http.StatusForbidden}
	codeUnsupported         = code{"UNSUPPORTED", http.StatusMethodNotAllowed}
	codeRouteUnknown        = code{"NOT_FOUND", http.StatusNotFound}
	codeTooManyRequests     = code{"TOOMANYREQUESTS", http.StatusTooManyRequests}
	codeTooLarge            = code{"SIZE_INVALID", http.StatusRequestEntityTooLarge}
	codeRangeInvalid        = code{"BLOB_UPLOAD_INVALID", http.StatusRequestedRangeNotSatisfiable}
	// A Range of a blob pull that cannot be served; the spec has no code
	// for it (a blob that is there, asked for wrongly).
	codeRangeNotSatisfiable = code{"UNSUPPORTED", http.StatusRequestedRangeNotSatisfiable}
	codeUnavailable         = code{"UNAVAILABLE", http.StatusServiceUnavailable}
	codeBadGateway          = code{"UNAVAILABLE", http.StatusBadGateway}
	codeInternal            = code{"UNKNOWN", http.StatusInternalServerError}
	// A full disk. The spec has no code for it; distribution answers 500
	// UNKNOWN. 507 Insufficient Storage (RFC 4918) says what happened to
	// an operator reading logs, every client retries a 5xx like a 503, and
	// UNAVAILABLE is the spec's code for "try again later".
	codeInsufficientStorage = code{"UNAVAILABLE", http.StatusInsufficientStorage}
	codeAdminInvalid        = code{"UNSUPPORTED", http.StatusBadRequest} // a bad /v2/_slipway/ parameter
	codeAdminUnknown        = code{"UNSUPPORTED", http.StatusNotFound}   // an unknown /v2/_slipway/ object (a prefetch job)
	// A bad ?n= on a listing; not in the spec's table, distribution's code.
	codePaginationInvalid = code{"PAGINATION_NUMBER_INVALID", http.StatusBadRequest}
	// A request body that stalled (cmd's --body-stall-timeout moved the
	// connection's read deadline past it). The spec has no code for it:
	// 408 says the client was too slow, and the code says which upload or
	// manifest it was.
	codeBlobBodyStalled     = code{"BLOB_UPLOAD_INVALID", http.StatusRequestTimeout}
	codeManifestBodyStalled = code{"MANIFEST_INVALID", http.StatusRequestTimeout}
)

// ociError is an error a client sees: a code and a message.
type ociError struct {
	code    code
	message string
	cause   error
	header  http.Header // extra response headers (Retry-After, WWW-Authenticate)
}

func (e *ociError) Error() string {
	if e.cause != nil {
		return e.code.name + ": " + e.message + ": " + e.cause.Error()
	}
	return e.code.name + ": " + e.message
}

func (e *ociError) Unwrap() error { return e.cause }

func newError(c code, msg string) *ociError { return &ociError{code: c, message: msg} }

func wrapError(c code, msg string, cause error) *ociError {
	return &ociError{code: c, message: msg, cause: cause}
}

// Errors of the request itself, found before any work.
var (
	errRouteUnknown      = newError(codeRouteUnknown, "unknown route")
	errNameInvalid       = newError(codeNameInvalid, "invalid repository name")
	errTagInvalid        = newError(codeTagInvalid, "invalid tag")
	errDigestInvalid     = newError(codeDigestInvalid, "invalid digest")
	errDigestUnsupported = newError(codeDigestInvalid, "unsupported digest algorithm (sha256 and sha512 are supported)")
	errUploadUnknown     = newError(codeBlobUploadUnknown, "blob upload unknown")
	errMethod            = newError(codeUnsupported, "method not allowed on this route")
)

// toOCI maps any error a handler returned to what the client sees. kind
// tells "not found" of a blob from "not found" of a manifest.
func toOCI(err error, kind routeKind) *ociError {
	var oe *ociError
	if errors.As(err, &oe) {
		return oe
	}
	var he *echo.HTTPError
	if errors.As(err, &he) {
		switch he.Code {
		case http.StatusNotFound:
			return errRouteUnknown
		case http.StatusMethodNotAllowed:
			return errMethod
		case http.StatusRequestEntityTooLarge:
			return wrapError(codeTooLarge, "request body too large", err)
		}
		if he.Code < 500 {
			return wrapError(code{"UNSUPPORTED", he.Code}, fmt.Sprint(he.Message), err)
		}
	}
	var rl *upstream.RateLimitError
	// push errors say what was wrong with the request: their text, less
	// the package prefix, is the message.
	pushMsg := strings.TrimPrefix(err.Error(), "push: ")
	switch {
	case errors.Is(err, cache.ErrNoSpace):
		return wrapError(codeInsufficientStorage, "the mirror's disk is full; try again later", err)
	case errors.Is(err, cache.ErrSharedUnavailable):
		return wrapError(codeUnavailable, "the fleet's shared store is unavailable; try again", err)
	case errors.Is(err, cache.ErrGraceTooShort):
		return wrapError(codeAdminInvalid, strings.TrimPrefix(err.Error(), "cache: "), err)
	case errors.Is(err, push.ErrUploadUnknown):
		return wrapError(codeBlobUploadUnknown, pushMsg, err)
	case errors.Is(err, push.ErrRangeInvalid):
		return wrapError(codeRangeInvalid, pushMsg, err)
	case errors.Is(err, push.ErrSizeInvalid):
		return wrapError(codeSizeInvalid, pushMsg, err)
	case errors.Is(err, push.ErrDigestInvalid):
		return wrapError(codeDigestInvalid, pushMsg, err)
	case errors.Is(err, push.ErrManifestTooLarge):
		return wrapError(codeTooLarge, pushMsg, err)
	case errors.Is(err, push.ErrManifestInvalid):
		return wrapError(codeManifestInvalid, pushMsg, err)
	case errors.Is(err, push.ErrManifestBlobUnknown):
		return wrapError(codeManifestBlobUnknown, pushMsg, err)
	case errors.Is(err, push.ErrManifestUnknown):
		return wrapError(codeManifestUnknown, pushMsg, err)
	case errors.Is(err, push.ErrBlobUnknown):
		return wrapError(codeBlobUnknown, pushMsg, err)
	case errors.Is(err, push.ErrNameUnknown):
		return wrapError(codeNameUnknown, pushMsg, err)
	case errors.Is(err, push.ErrDenied):
		return wrapError(codeDenied, pushMsg, err)
	case errors.Is(err, upstream.ErrNotFound), errors.Is(err, cache.ErrNotFound):
		switch kind {
		case routeBlob:
			return wrapError(codeBlobUnknown, "blob unknown to registry", err)
		case routeManifest, routeReferrers:
			return wrapError(codeManifestUnknown, "manifest unknown", err)
		}
		return wrapError(codeNameUnknown, "repository name not known to registry", err)
	case errors.Is(err, upstream.ErrUnauthorized):
		return wrapError(codeDenied, "the upstream registry refused access (the repository may not exist, or it needs credentials)", err)
	case errors.As(err, &rl):
		e := wrapError(codeTooManyRequests, "the upstream registry is rate limiting this mirror", err)
		if rl.RetryAfter > 0 {
			e.header = http.Header{"Retry-After": {strconv.Itoa(int(rl.RetryAfter.Seconds()))}}
		}
		return e
	case errors.Is(err, upstream.ErrRateLimited):
		return wrapError(codeTooManyRequests, "the upstream registry is rate limiting this mirror", err)
	case errors.Is(err, upstream.ErrForbiddenHost):
		return wrapError(codeBadGateway, "the upstream sent this mirror to a host it will not contact", err)
	case errors.Is(err, upstream.ErrTooLarge):
		return wrapError(codeBadGateway, "the upstream sent a manifest over the 4 MiB limit", err)
	case errors.Is(err, upstream.ErrBadResponse):
		return wrapError(codeBadGateway, "the upstream registry sent a bad response", err)
	case errors.Is(err, upstream.ErrUnavailable), errors.Is(err, context.DeadlineExceeded):
		return wrapError(codeUnavailable, "the upstream registry is unavailable", err)
	case errors.Is(err, cache.ErrClosed):
		return wrapError(codeUnavailable, "shutting down", err)
	}
	if oe := bodyError(err, kind); oe != nil {
		return oe
	}
	return wrapError(codeInternal, "internal error", err)
}

// bodyReader marks the errors of reading a request body, so that one the
// client caused (a malformed chunked encoding, a reset) is never a 500,
// however deep it was wrapped.
type bodyReader struct{ io.ReadCloser }

func (b bodyReader) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF {
		err = &requestBodyError{err}
	}
	return n, err
}

// requestBodyError is a failed read of the request body.
type requestBodyError struct{ err error }

func (e *requestBodyError) Error() string { return "reading the request body: " + e.err.Error() }
func (e *requestBodyError) Unwrap() error { return e.err }

// bodyError maps a failed read of the request body: the client's fault,
// never a 500. Nothing above reads a network connection of its own without
// turning the error into a sentinel (upstream's classify), so what is left
// here came from the request body.
func bodyError(err error, kind routeKind) *ociError {
	stalled, invalid := codeBlobBodyStalled, codeBlobUploadInvalid
	if kind == routeManifest {
		stalled, invalid = codeManifestBodyStalled, codeManifestInvalid
	}
	var mb *http.MaxBytesError
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return wrapError(stalled, "request body stalled: too few bytes arrived in time", err)
	case errors.As(err, &mb):
		return wrapError(codeTooLarge, "request body too large", err)
	case errors.Is(err, io.ErrUnexpectedEOF):
		// The client closed (or half-closed) before its Content-Length
		// or the last chunk.
		return wrapError(invalid, "request body ended early", err)
	case errors.Is(err, syscall.ECONNRESET):
		return wrapError(invalid, "the client reset the connection during the request body", err)
	case errors.As(err, new(*requestBodyError)):
		return wrapError(invalid, "the request body could not be read (a malformed chunked encoding?)", err)
	}
	return nil
}

// ociBody is the spec's error body with one error.
func ociBody(code, message string) []byte {
	b, _ := json.Marshal(errorBody{Errors: []errorEntry{{Code: code, Message: message}}})
	return b
}

type errorBody struct {
	Errors []errorEntry `json:"errors"`
}

type errorEntry struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Detail  any    `json:"detail,omitempty"`
}

// handleError is echo's HTTPErrorHandler: the one place that turns an error
// into a response and logs it.
func (s *Server) handleError(err error, c echo.Context) {
	rq := requestOf(c)
	kind := routeBase
	if rq.hasRoute {
		kind = rq.route.kind
	}
	oe := toOCI(err, kind)
	rq.err = err
	if c.Response().Committed {
		return
	}
	if errors.Is(err, context.Canceled) && c.Request().Context().Err() != nil {
		// The client left; nobody reads this answer.
		c.Response().WriteHeader(499)
		return
	}
	h := c.Response().Header()
	for k, v := range oe.header {
		h[k] = v
	}
	if c.Request().Method == http.MethodHead {
		c.Response().WriteHeader(oe.code.status)
		return
	}
	body := ociBody(oe.code.name, oe.message)
	h.Set(echo.HeaderContentType, echo.MIMEApplicationJSON)
	h.Set(echo.HeaderContentLength, strconv.Itoa(len(body)))
	c.Response().WriteHeader(oe.code.status)
	c.Response().Write(body)
}
