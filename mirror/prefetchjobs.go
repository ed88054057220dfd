package mirror

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"mime"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/labstack/echo/v4"

	"slipway/upstream"
)

// Prefetch jobs: POST /v2/_slipway/prefetch (prefetch.go) answers when
// every image is stored; the status page needs to show progress while it
// works, so it starts a job and polls it:
//
//	POST /v2/_slipway/prefetch/jobs   {"images": [...], "platform": "..."} -> 202, the job
//	GET  /v2/_slipway/prefetch/jobs/<id>                                  -> 200, the job
//
// A job does what the synchronous call does (prefetchAll), on the
// server's context, not the client's. Jobs are bounded: at most
// maxRunningJobs run at once (more is 429), at most maxKeptJobs are kept,
// and a finished one is forgotten jobTTL after it ended. Both calls count
// as pulls for authentication (their path starts with the prefetch one).

const (
	maxRunningJobs = 4
	maxKeptJobs    = 64
	jobTTL         = time.Hour
)

// prefetchProgress follows one image of a job while it is prefetched.
// Its methods do nothing on a nil receiver (the synchronous call).
type prefetchProgress struct {
	blobs, blobsTotal, cached, fetched, bytes atomic.Int64
}

func (p *prefetchProgress) noted(src upstream.Source) {
	if p == nil {
		return
	}
	switch src {
	case upstream.SourceMiss, upstream.SourceJoined:
		p.fetched.Add(1)
	default:
		p.cached.Add(1)
	}
}

// expect counts the blobs of one image manifest as to be done.
func (p *prefetchProgress) expect(blobs []v1.Descriptor) {
	if p == nil {
		return
	}
	for _, b := range blobs {
		if b.Digest.Hex != "" {
			p.blobsTotal.Add(1)
		}
	}
}

func (p *prefetchProgress) blobDone() {
	if p != nil {
		p.blobs.Add(1)
	}
}

// sink is where a streamed blob's bytes go: counted here.
func (p *prefetchProgress) sink() io.Writer {
	if p == nil {
		return io.Discard
	}
	return byteCounter{&p.bytes}
}

type byteCounter struct{ n *atomic.Int64 }

func (c byteCounter) Write(b []byte) (int, error) {
	c.n.Add(int64(len(b)))
	return len(b), nil
}

// prefetchJobs are the jobs of one Server.
type prefetchJobs struct {
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	jobs   map[string]*prefetchJob
	closed bool
}

func newPrefetchJobs() *prefetchJobs {
	ctx, cancel := context.WithCancel(context.Background())
	return &prefetchJobs{ctx: ctx, cancel: cancel, jobs: map[string]*prefetchJob{}}
}

// close cancels the jobs still running and waits for them; no job starts
// after it.
func (js *prefetchJobs) close() {
	js.mu.Lock()
	js.closed = true
	js.mu.Unlock()
	js.cancel()
	js.wg.Wait()
}

type prefetchJob struct {
	id       string
	started  time.Time
	platform string
	images   []jobImage

	mu       sync.Mutex
	finished time.Time // zero while it runs
}

type jobImage struct {
	progress prefetchProgress
	mu       sync.Mutex
	state    string // "waiting", "running", "done", "failed"
	result   PrefetchResult
}

// jobBody is a job as the API answers it.
type jobBody struct {
	ID string `json:"id"`
	// State is "running", "done" (every image is stored) or "failed"
	// (it ended, and some image failed).
	State        string         `json:"state"`
	Platform     string         `json:"platform,omitempty"`
	Started      time.Time      `json:"started"`
	Finished     time.Time      `json:"finished,omitzero"`
	ImagesTotal  int            `json:"images_total"`
	ImagesDone   int            `json:"images_done"` // ended, stored or failed
	ImagesFailed int            `json:"images_failed"`
	BlobsTotal   int64          `json:"blobs_total"` // known so far: grows as manifests arrive
	BlobsDone    int64          `json:"blobs_done"`
	Bytes        int64          `json:"bytes"` // fetched from upstreams so far
	Images       []jobImageBody `json:"images"`
}

type jobImageBody struct {
	Image      string `json:"image"`
	State      string `json:"state"`
	BlobsTotal int64  `json:"blobs_total"`
	BlobsDone  int64  `json:"blobs_done"`
	Cached     int64  `json:"cached"`
	Fetched    int64  `json:"fetched"`
	Bytes      int64  `json:"bytes"`
	Error      string `json:"error,omitempty"`
}

func (j *prefetchJob) body() jobBody {
	j.mu.Lock()
	b := jobBody{ID: j.id, State: "running", Platform: j.platform, Started: j.started, Finished: j.finished,
		ImagesTotal: len(j.images), Images: make([]jobImageBody, len(j.images))}
	j.mu.Unlock()
	for i := range j.images {
		im := &j.images[i]
		im.mu.Lock()
		ib := jobImageBody{Image: im.result.Image, State: im.state, Error: im.result.Error}
		im.mu.Unlock()
		p := &im.progress
		ib.BlobsTotal, ib.BlobsDone, ib.Cached, ib.Fetched, ib.Bytes =
			p.blobsTotal.Load(), p.blobs.Load(), p.cached.Load(), p.fetched.Load(), p.bytes.Load()
		switch ib.State {
		case "done":
			b.ImagesDone++
		case "failed":
			b.ImagesDone++
			b.ImagesFailed++
		}
		b.BlobsTotal += ib.BlobsTotal
		b.BlobsDone += ib.BlobsDone
		b.Bytes += ib.Bytes
		b.Images[i] = ib
	}
	if !b.Finished.IsZero() {
		b.State = "done"
		if b.ImagesFailed > 0 {
			b.State = "failed"
		}
	}
	return b
}

// add registers j if the bounds allow, dropping jobs that ended long ago
// (and, when full, the one that ended first), and counts it as running
// (js.wg): the caller starts it.
func (js *prefetchJobs) add(j *prefetchJob, now time.Time) error {
	js.mu.Lock()
	defer js.mu.Unlock()
	if js.closed {
		return newError(codeUnavailable, "the server is shutting down")
	}
	running := 0
	var oldest *prefetchJob
	var oldestEnd time.Time
	for id, o := range js.jobs {
		o.mu.Lock()
		end := o.finished
		o.mu.Unlock()
		switch {
		case end.IsZero():
			running++
		case now.Sub(end) > jobTTL:
			delete(js.jobs, id)
		case oldest == nil || end.Before(oldestEnd):
			oldest, oldestEnd = o, end
		}
	}
	if running >= maxRunningJobs {
		return &ociError{code: codeTooManyRequests, message: fmt.Sprintf("%d prefetch jobs are running: try again when one has ended", running),
			header: http.Header{"Retry-After": {"10"}}}
	}
	if len(js.jobs) >= maxKeptJobs && oldest != nil {
		delete(js.jobs, oldest.id)
	}
	js.jobs[j.id] = j
	js.wg.Add(1)
	return nil
}

func (js *prefetchJobs) get(id string, now time.Time) (*prefetchJob, bool) {
	js.mu.Lock()
	defer js.mu.Unlock()
	j, ok := js.jobs[id]
	if !ok {
		return nil, false
	}
	j.mu.Lock()
	end := j.finished
	j.mu.Unlock()
	if !end.IsZero() && now.Sub(end) > jobTTL {
		delete(js.jobs, id)
		return nil, false
	}
	return j, true
}

// postPrefetchJob starts a prefetch job. It takes JSON only (a request
// another site's form could send is refused).
func (s *Server) postPrefetchJob(c echo.Context) error {
	uiHeaders(c)
	if mt, _, _ := mime.ParseMediaType(c.Request().Header.Get(echo.HeaderContentType)); mt != echo.MIMEApplicationJSON {
		return newError(codeAdminInvalid, "send the job as JSON, with Content-Type: application/json")
	}
	req, refs, plat, err := readPrefetch(c, "job")
	if err != nil {
		return err
	}
	var id [16]byte
	rand.Read(id[:])
	now := time.Now()
	j := &prefetchJob{id: hex.EncodeToString(id[:]), started: now, platform: req.Platform, images: make([]jobImage, len(req.Images))}
	for i, im := range req.Images {
		j.images[i].state, j.images[i].result.Image = "waiting", im
	}
	if err := s.jobs.add(j, now); err != nil {
		return err
	}
	ns := nsParam(c)
	go func() {
		defer s.jobs.wg.Done()
		s.prefetchAll(s.jobs.ctx, ns, req.Images, refs, plat, func(i int) *prefetchProgress {
			im := &j.images[i]
			im.mu.Lock()
			im.state = "running"
			im.mu.Unlock()
			return &im.progress
		}, func(i int, r PrefetchResult) {
			im := &j.images[i]
			im.mu.Lock()
			im.state, im.result = "done", r
			if r.Error != "" {
				im.state = "failed"
			}
			im.mu.Unlock()
		})
		j.mu.Lock()
		j.finished = time.Now()
		j.mu.Unlock()
	}()
	c.Response().Header().Set(echo.HeaderLocation, "/v2/_slipway/prefetch/jobs/"+j.id)
	return c.JSON(http.StatusAccepted, j.body())
}

// getPrefetchJob answers a job's progress.
func (s *Server) getPrefetchJob(c echo.Context) error {
	uiHeaders(c)
	j, ok := s.jobs.get(c.Param("id"), time.Now())
	if !ok {
		return newError(codeAdminUnknown, "no such prefetch job (jobs are forgotten an hour after they end)")
	}
	return c.JSON(http.StatusOK, j.body())
}

// Close stops the prefetch jobs still running and waits for them. Call it
// after the HTTP server stopped and before the fills are closed.
func (s *Server) Close() { s.jobs.close() }
