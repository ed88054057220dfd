package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"net/http"
	"sort"
	"time"
)

// The client is kept cheap so that it is not what gets measured: bodies
// are read into one reusable buffer per worker, large enough that the
// transport's bufio hands reads straight through, and hashed only where a
// scenario checks content.

const readBuf = 1 << 20

// newTransport gives each worker its own keep-alive connection(s).
func newTransport() *http.Transport {
	return &http.Transport{
		DisableCompression:  true,
		MaxIdleConnsPerHost: 64,
		ReadBufferSize:      64 << 10,
		WriteBufferSize:     64 << 10,
	}
}

// fetchResult is one GET: status, bytes read, time to the first body byte
// and to the last.
type fetchResult struct {
	status int
	n      int64
	ttfb   time.Duration
	total  time.Duration
	digest string // sha256:..., only when asked for
}

// fetch GETs url and reads the body into buf. With check set it also
// hashes the body.
func fetch(c *http.Client, url string, header http.Header, buf []byte, check bool) (fetchResult, error) {
	var r fetchResult
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return r, err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	t0 := time.Now()
	resp, err := c.Do(req)
	if err != nil {
		return r, err
	}
	defer resp.Body.Close()
	r.status = resp.StatusCode
	var h hash.Hash
	if check {
		h = sha256.New()
	}
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 {
			if r.n == 0 {
				r.ttfb = time.Since(t0)
			}
			r.n += int64(n)
			if h != nil {
				h.Write(buf[:n])
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			r.total = time.Since(t0)
			return r, fmt.Errorf("GET %s: after %d bytes: %w", url, r.n, err)
		}
	}
	r.total = time.Since(t0)
	if h != nil {
		r.digest = "sha256:" + hex.EncodeToString(h.Sum(nil))
	}
	return r, nil
}

// fetchOK is fetch that also wants 200 and, when want is not zero, exactly
// want bytes.
func fetchOK(c *http.Client, url string, header http.Header, buf []byte, want int64, check bool) (fetchResult, error) {
	r, err := fetch(c, url, header, buf, check)
	if err != nil {
		return r, err
	}
	if r.status != http.StatusOK {
		return r, fmt.Errorf("GET %s: status %d", url, r.status)
	}
	if want > 0 && r.n != want {
		return r, fmt.Errorf("GET %s: %d bytes, want %d", url, r.n, want)
	}
	return r, nil
}

// spread is min, median and max of a set of durations, in milliseconds.
type spread struct {
	MinMs    float64 `json:"min_ms"`
	MedianMs float64 `json:"median_ms"`
	MaxMs    float64 `json:"max_ms"`
}

func spreadOf(ds []time.Duration) spread {
	if len(ds) == 0 {
		return spread{}
	}
	s := sortedCopy(ds)
	return spread{MinMs: ms(s[0]), MedianMs: ms(s[len(s)/2]), MaxMs: ms(s[len(s)-1])}
}

// percentile of sorted durations, p in [0, 100].
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted)-1) * p / 100)
	return sorted[i]
}

func sortedCopy(ds []time.Duration) []time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

const gib = float64(1 << 30)
