package upstream

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"sync"
	"time"
	"unicode"
)

// Health is what an upstream's recent answers say about it, for the status
// page. LastErrorText is the upstream's own words where it sent any: it is
// untrusted text (a hostile or broken upstream chooses it), to be escaped
// wherever it is shown.
type Health struct {
	LastSuccess   time.Time // last answer that was not a failure (a 404 is an answer)
	LastError     time.Time // last failure: no answer, 5xx, 429, 401 or 403
	LastErrorText string
	// BackoffUntil is set after a 429: no request goes to the upstream
	// before it (zero: not backing off).
	BackoffUntil time.Time
	Last429      time.Time
	// RateLimitRemaining is the last ratelimit-remaining (Docker Hub's
	// pulls left), -1 if none was seen.
	RateLimitRemaining int64
	// Requests is the number of requests sent, Responses the same by status
	// code ("error": no answer).
	Requests  uint64
	Responses map[string]uint64
}

// Failing reports whether the last thing heard from the upstream was a
// failure.
func (h Health) Failing() bool { return h.LastError.After(h.LastSuccess) }

// Backoff reports whether requests are held back after a 429 at now.
func (h Health) Backoff(now time.Time) bool { return h.BackoffUntil.After(now) }

// Health returns a snapshot of the upstream's health.
func (c *Client) Health() Health {
	h := c.health.snapshot()
	c.mu.Lock()
	h.BackoffUntil = c.backoffUntil
	c.mu.Unlock()
	h.RateLimitRemaining = c.RateLimitRemaining()
	h.Responses = c.Responses()
	for _, n := range h.Responses {
		h.Requests += n
	}
	return h
}

// health records when requests to one upstream last succeeded and failed,
// and why. It is written where requests finish (doOnce).
type health struct {
	now func() time.Time // nil: time.Now

	mu        sync.Mutex
	okAt      time.Time
	errAt     time.Time
	errText   string
	limitedAt time.Time
}

func (h *health) clock() time.Time {
	if h.now != nil {
		return h.now()
	}
	return time.Now()
}

func (h *health) snapshot() Health {
	h.mu.Lock()
	defer h.mu.Unlock()
	return Health{LastSuccess: h.okAt, LastError: h.errAt, LastErrorText: h.errText, Last429: h.limitedAt}
}

// failed records a request that got no answer. A request its own caller
// gave up on says nothing about the upstream.
func (h *health) failed(ctx context.Context, err error) {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(ctx.Err(), context.Canceled) {
		return
	}
	h.note(false, clean(err.Error()), false)
}

// answered records an answer with status code; err is how the client
// classified a failed one, body the start of its body.
func (h *health) answered(code int, err error, body []byte) {
	if !failure(code) {
		h.note(true, "", false)
		return
	}
	text := err.Error()
	if msg := upstreamMessage(body); msg != "" {
		text += ": the upstream said: " + msg
	}
	h.note(false, clean(text), code == http.StatusTooManyRequests)
}

func (h *health) note(ok bool, text string, limited bool) {
	now := h.clock()
	h.mu.Lock()
	defer h.mu.Unlock()
	if ok {
		h.okAt = now
		return
	}
	h.errAt, h.errText = now, text
	if limited {
		h.limitedAt = now
	}
}

// failure tells the answers that say the upstream cannot serve (down,
// overloaded, rate limiting, refusing our credentials) from answers about
// what was asked (200, 404).
func failure(code int) bool {
	return code >= 500 || code == http.StatusTooManyRequests ||
		code == http.StatusUnauthorized || code == http.StatusForbidden
}

// Bounds of the error text kept: the message read from a body, and the
// whole text.
const (
	maxMessage   = 300
	maxErrorText = 600
)

// upstreamMessage is what an error body says: the messages of an OCI
// error body ({"errors":[{"code":...,"message":...}]}), or else the body's
// text, shortened.
func upstreamMessage(body []byte) string {
	var oci struct {
		Errors []struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"errors"`
	}
	if json.Unmarshal(body, &oci) == nil && len(oci.Errors) > 0 {
		parts := []string{}
		for _, e := range oci.Errors[:min(len(oci.Errors), 4)] {
			parts = append(parts, strings.TrimSpace(e.Code+" "+e.Message))
		}
		return shorten(strings.Join(parts, "; "), maxMessage)
	}
	return shorten(string(body), maxMessage)
}

// clean makes text fit for showing: valid UTF-8, no control characters,
// runs of white space as one space, at most maxErrorText bytes. It does not
// escape anything: that is the job of whatever shows it.
func clean(text string) string { return shorten(text, maxErrorText) }

func shorten(s string, n int) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	var b strings.Builder
	space := false
	for _, r := range s {
		if unicode.IsSpace(r) || unicode.IsControl(r) {
			space = b.Len() > 0
			continue
		}
		if space {
			b.WriteByte(' ')
			space = false
		}
		if b.Len()+len(string(r)) > n {
			b.WriteString("…")
			break
		}
		b.WriteRune(r)
	}
	return b.String()
}
