package mirror

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/opencontainers/go-digest"

	"slipway/cache"
)

var modelSeconds = flag.Float64("model.seconds", 0, "run TestStoreModel this long (default 5 s; SLIPWAY_MODEL_SECONDS too)")

// TestStoreModel is a randomized model test of the store's lifecycle
// under concurrency (issue 12). Workers mix pushes of every shape
// (single POST, monolithic, chunked, HEAD-then-skip as docker does,
// cross-repository mounts) from a shared pool of layers, re-pushes,
// manifest PUTs that move tags, DELETEs of tags and manifests, and pulls
// of proxied images through fills while the upstream moves its tags; GC
// passes with a grace of a few hundred milliseconds and eviction passes
// on a budget far under what is pushed run all along. A model records
// every manifest acknowledged with a 201 and not deleted since.
//
// Afterwards every such manifest pulls whole, by tag and by digest, with
// every blob it references; verify is clean; and the blob files on disk
// take at most the budget plus the bytes of the pushed content that is
// still referenced.
func TestStoreModel(t *testing.T) {
	run := 5 * time.Second
	if *modelSeconds > 0 {
		run = time.Duration(*modelSeconds * float64(time.Second))
	} else if v := os.Getenv("SLIPWAY_MODEL_SECONDS"); v != "" {
		var f float64
		fmt.Sscan(v, &f)
		run = time.Duration(f * float64(time.Second))
	}
	const (
		grace  = 100 * time.Millisecond
		budget = 512 << 10
	)
	e := &modelEnv{newLifeEnv(t, cache.Options{Now: time.Now, GCGrace: grace, MinGCGrace: -1, MaxSize: budget,
		LowWatermark: 0.5, HighWatermark: 0.8, MaintenanceInterval: 20 * time.Millisecond})}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d, %s", seed, run)

	// Upstream images, some of whose tags move while the test runs.
	upTags := []string{"lib/a:1", "lib/a:2", "lib/b:1", "lib/c:latest"}
	for _, ref := range upTags {
		e.pushUpstream(t, ref)
	}
	// A pool of layers the pushes share, so that many of them race on one
	// digest. The upstream has them too: pulls bring them in as pulled
	// content while pushes and GC come and go.
	pool := make([][]byte, 32)
	for i := range pool {
		pool[i] = randomBytes(t, 1<<10+i*1<<10)
		e.up.pushBlobTo(t, "lib/pool", pool[i])
	}

	m := &model{images: map[string]map[string]digest.Digest{}, manifests: map[string]map[digest.Digest]modelImage{}}
	deadline := time.Now().Add(run)
	var wg sync.WaitGroup
	var ops, retries, failures atomic.Int64
	fail := func(format string, args ...any) {
		failures.Add(1)
		t.Errorf(format, args...)
	}
	const workers = 6
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			repos := []string{fmt.Sprintf("local/w%d/app", w), fmt.Sprintf("local/w%d/tool", w)}
			for i := 0; time.Now().Before(deadline) && failures.Load() < 5 && i < 100_000; i++ {
				ops.Add(1)
				repo := repos[rng.IntN(len(repos))]
				switch op := rng.IntN(100); {
				case op < 35:
					r, err := e.pushImage(m, rng, pool, repo, repos, grace)
					retries.Add(int64(r))
					if err != nil {
						fail("worker %d: push to %s: %v", w, repo, err)
					}
				case op < 45:
					b := pool[rng.IntN(len(pool))]
					if err := pushShapes[rng.IntN(len(pushShapes))].push(e.srv.URL, repo, digest.FromBytes(b), b); err != nil {
						fail("worker %d: re-push to %s: %v", w, repo, err)
					}
				case op < 65:
					if err := e.deleteSomething(m, rng, repo); err != nil {
						fail("worker %d: delete in %s: %v", w, repo, err)
					}
				case op < 75:
					if err := e.pullLocal(m, rng, repo); err != nil {
						fail("worker %d: pull from %s: %v", w, repo, err)
					}
				case op < 85:
					ref := upTags[rng.IntN(len(upTags))]
					if err := e.pullProxied(ref); err != nil {
						fail("worker %d: pull of %s through the mirror: %v", w, ref, err)
					}
				default:
					b := pool[rng.IntN(len(pool))]
					resp, err := sendErr("GET", e.srv.URL+"/v2/lib/pool/blobs/"+string(digest.FromBytes(b)), nil, nil)
					if err == nil {
						err = want(resp, http.StatusOK)
					}
					if err == nil && readAll(resp) != string(b) {
						err = errors.New("wrong bytes")
					}
					if err != nil {
						fail("worker %d: pull of a pool layer through the mirror: %v", w, err)
					}
				}
			}
		}()
	}
	// The upstream moves its tags; GC and eviction passes run all along.
	wg.Add(2)
	go func() {
		defer wg.Done()
		for i := 0; time.Now().Before(deadline) && i < 10_000; i++ {
			time.Sleep(150 * time.Millisecond)
			e.pushUpstream(t, upTags[i%len(upTags)])
		}
	}()
	var passes atomic.Int64
	go func() {
		defer wg.Done()
		for i := 0; time.Now().Before(deadline) && i < 100_000; i++ {
			time.Sleep(time.Duration(rand.IntN(20)) * time.Millisecond)
			var err error
			if i%2 == 0 {
				_, err = e.store.GC(cache.GCOptions{})
			} else {
				_, err = e.store.Evict(budget/4, false)
			}
			if err != nil {
				fail("pass %d: %v", i, err)
			}
			passes.Add(1)
		}
	}()
	wg.Wait()

	// Quiet now: past the grace, one more GC and eviction, then check.
	time.Sleep(2 * grace)
	gc, err := e.store.GC(cache.GCOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.EvictToBudget(); err != nil {
		t.Fatal(err)
	}
	st := e.store.Stats()
	t.Logf("%d operations, %d manifest retries after a blob GC took, %d GC/eviction passes; evicted %d blobs and %d manifests; last GC removed %d blobs, %d manifests, %d links",
		ops.Load(), retries.Load(), passes.Load(), st.Evicted, st.EvictedManifests, gc.Blobs, gc.Manifests, gc.Links)

	var pushedBytes int64
	blobs := map[digest.Digest]int64{}
	checked := 0
	for repo, byDigest := range m.manifests {
		for d, img := range byDigest {
			if err := e.pullManifest(repo, string(d), d, img); err != nil {
				t.Errorf("acknowledged manifest %s@%s: %v", repo, d, err)
			}
			checked++
			pushedBytes += int64(len(img.body))
			for bd, size := range img.blobs {
				blobs[bd] = size
			}
		}
		for tag, d := range m.images[repo] {
			if err := e.pullManifest(repo, tag, d, byDigest[d]); err != nil {
				t.Errorf("acknowledged tag %s:%s: %v", repo, tag, err)
			}
		}
	}
	for _, size := range blobs {
		pushedBytes += size
	}
	if checked == 0 {
		t.Fatal("no manifest was acknowledged: the model checked nothing")
	}
	vr, err := e.store.Verify(t.Context(), cache.VerifyOptions{})
	if err != nil || !vr.OK() {
		t.Errorf("verify: %v, %+v", err, vr.Problems)
	}
	onDisk := diskUse(t, filepath.Join(e.dir, "blobs"))
	if limit := int64(budget) + pushedBytes; onDisk > limit || st.Bytes > limit {
		t.Errorf("blob files take %d bytes (the index counts %d), over the budget %d plus the pushed content %d", onDisk, st.Bytes, budget, pushedBytes)
	}
	t.Logf("%d acknowledged manifests pull whole; %d bytes on disk, budget %d, pushed content %d", checked, onDisk, budget, pushedBytes)
}

// model is what the mirror acknowledged: per local repository, its tags and
// the manifests it holds by digest.
type model struct {
	mu        sync.Mutex
	images    map[string]map[string]digest.Digest     // repo -> tag -> manifest
	manifests map[string]map[digest.Digest]modelImage // repo -> manifest -> image
}

type modelImage struct {
	body  []byte
	blobs map[digest.Digest]int64
}

// modelEnv is a lifeEnv on the real clock, with the model's operations.
type modelEnv struct{ *lifeEnv }

func (e *modelEnv) pushUpstream(t *testing.T, ref string) {
	img, err := random.Image(4<<10, 2)
	if err != nil {
		t.Error(err)
		return
	}
	e.up.pushImageTo(t, img, ref)
}

// pushImage pushes a new image (config and layers from the pool) to repo
// under a tag, the way a client does: each blob HEADed first and skipped
// if there, mounted from a sibling repository, or uploaded in any shape.
// A manifest PUT that finds a blob gone (GC took it: its grace is short)
// re-pushes and retries, as a client would; only a 201 enters the model.
func (e *modelEnv) pushImage(m *model, rng *rand.Rand, pool [][]byte, repo string, siblings []string, grace time.Duration) (int, error) {
	config := []byte(fmt.Sprintf(`{"architecture":"amd64","os":"linux","n":%d}`, rng.Uint64()))
	var layers [][]byte
	for range 1 + rng.IntN(3) {
		layers = append(layers, pool[rng.IntN(len(pool))])
	}
	body := imageManifest(config, layers...)
	img := modelImage{body: body, blobs: map[digest.Digest]int64{}}
	for _, b := range append([][]byte{config}, layers...) {
		img.blobs[digest.FromBytes(b)] = int64(len(b))
	}
	tag := fmt.Sprintf("t%d", rng.IntN(4))
	const attempts = 20
	for attempt := 0; attempt < attempts; attempt++ {
		start := time.Now()
		for _, b := range append([][]byte{config}, layers...) {
			if err := e.pushBlob(rng, repo, siblings, b); err != nil {
				return attempt, err
			}
		}
		resp, err := putManifest(e.srv.URL, repo, tag, body)
		if err != nil {
			return attempt, err
		}
		if resp.StatusCode == http.StatusCreated {
			d := digest.FromBytes(body)
			m.mu.Lock()
			if m.images[repo] == nil {
				m.images[repo], m.manifests[repo] = map[string]digest.Digest{}, map[digest.Digest]modelImage{}
			}
			m.images[repo][tag] = d
			m.manifests[repo][d] = img
			m.mu.Unlock()
			return attempt, nil
		}
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(readAll(resp), "MANIFEST_BLOB_UNKNOWN") {
			return attempt, want(resp, http.StatusCreated)
		}
		// Each blob was stored, re-pushed, mounted or HEADed since start:
		// a use. GC may take one only if this attempt outlasted the grace
		// (a busy machine makes some do so; they are retried).
		if took := time.Since(start); took < grace {
			return attempt, fmt.Errorf("manifest PUT: MANIFEST_BLOB_UNKNOWN %v after its blobs were pushed, inside the grace of %v", took, grace)
		}
	}
	return attempts, fmt.Errorf("manifest PUT: still MANIFEST_BLOB_UNKNOWN after %d re-pushes, each longer than the grace", attempts)
}

func (e *modelEnv) pushBlob(rng *rand.Rand, repo string, siblings []string, b []byte) error {
	d := digest.FromBytes(b)
	switch rng.IntN(4) {
	case 0: // docker: HEAD, and skip the upload if the repository has it
		resp, err := sendErr("HEAD", e.srv.URL+"/v2/"+repo+"/blobs/"+string(d), nil, nil)
		if err != nil {
			return err
		}
		if resp.StatusCode == http.StatusOK {
			return nil
		}
	case 1: // a mount from a sibling repository
		from := siblings[rng.IntN(len(siblings))]
		resp, err := sendErr("POST", e.srv.URL+"/v2/"+repo+"/blobs/uploads/?mount="+string(d)+"&from="+from, nil, nil)
		if err != nil {
			return err
		}
		if resp.StatusCode == http.StatusCreated {
			return nil
		}
		if resp.StatusCode != http.StatusAccepted {
			return want(resp, http.StatusAccepted)
		}
		// Not mounted: the session it opened is left to expire, as
		// clients that then push another way leave it.
	}
	return pushShapes[rng.IntN(len(pushShapes))].push(e.srv.URL, repo, d, b)
}

// deleteSomething deletes a tag, or a manifest by digest, of repo.
func (e *modelEnv) deleteSomething(m *model, rng *rand.Rand, repo string) error {
	m.mu.Lock()
	var tags []string
	for tag := range m.images[repo] {
		tags = append(tags, tag)
	}
	m.mu.Unlock()
	if len(tags) == 0 {
		return nil
	}
	tag := tags[rng.IntN(len(tags))]
	m.mu.Lock()
	d := m.images[repo][tag]
	m.mu.Unlock()
	ref := tag
	if rng.IntN(4) != 0 {
		ref = string(d)
	}
	resp, err := sendErr("DELETE", e.srv.URL+"/v2/"+repo+"/manifests/"+ref, nil, nil)
	if err != nil {
		return err
	}
	if err := want(resp, http.StatusAccepted); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if ref == tag {
		delete(m.images[repo], tag)
		return nil
	}
	delete(m.manifests[repo], d)
	for t, td := range m.images[repo] {
		if td == d {
			delete(m.images[repo], t)
		}
	}
	return nil
}

// pullLocal pulls one acknowledged image of repo, by tag or by digest.
func (e *modelEnv) pullLocal(m *model, rng *rand.Rand, repo string) error {
	m.mu.Lock()
	var ds []digest.Digest
	for d := range m.manifests[repo] {
		ds = append(ds, d)
	}
	m.mu.Unlock()
	if len(ds) == 0 {
		return nil
	}
	d := ds[rng.IntN(len(ds))]
	m.mu.Lock()
	img, ok := m.manifests[repo][d]
	m.mu.Unlock()
	if !ok {
		return nil // deleted meanwhile by this worker? (only it deletes here)
	}
	return e.pullManifest(repo, string(d), d, img)
}

// pullManifest GETs repo's ref, checks it is d and img, and GETs every blob
// it references, each verified against its digest.
func (e *modelEnv) pullManifest(repo, ref string, d digest.Digest, img modelImage) error {
	resp, err := sendErr("GET", e.srv.URL+"/v2/"+repo+"/manifests/"+ref, nil,
		http.Header{"Accept": {"application/vnd.oci.image.manifest.v1+json"}})
	if err != nil {
		return err
	}
	if err := want(resp, http.StatusOK); err != nil {
		return err
	}
	body := readAll(resp)
	if digest.FromString(body) != d {
		return fmt.Errorf("manifest %s is %s, want %s", ref, digest.FromString(body), d)
	}
	for bd, size := range img.blobs {
		resp, err := sendErr("GET", e.srv.URL+"/v2/"+repo+"/blobs/"+string(bd), nil, nil)
		if err != nil {
			return err
		}
		if err := want(resp, http.StatusOK); err != nil {
			return err
		}
		if b := readAll(resp); digest.FromString(b) != bd || int64(len(b)) != size {
			return fmt.Errorf("blob %s: %d wrong bytes", bd, len(b))
		}
	}
	return nil
}

// pullProxied pulls an upstream image through the mirror: its manifest by
// tag, then config and layers, each verified.
func (e *modelEnv) pullProxied(ref string) error {
	repo, tag, _ := strings.Cut(ref, ":")
	resp, err := sendErr("GET", e.srv.URL+"/v2/"+repo+"/manifests/"+tag, nil,
		http.Header{"Accept": {"application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json"}})
	if err != nil {
		return err
	}
	if err := want(resp, http.StatusOK); err != nil {
		return err
	}
	var man struct {
		Config struct{ Digest digest.Digest }
		Layers []struct{ Digest digest.Digest }
	}
	if err := json.Unmarshal([]byte(readAll(resp)), &man); err != nil {
		return err
	}
	for _, d := range append([]digest.Digest{man.Config.Digest}, func() (ds []digest.Digest) {
		for _, l := range man.Layers {
			ds = append(ds, l.Digest)
		}
		return ds
	}()...) {
		resp, err := sendErr("GET", e.srv.URL+"/v2/"+repo+"/blobs/"+string(d), nil, nil)
		if err != nil {
			return err
		}
		if resp.StatusCode == http.StatusNotFound {
			// The upstream moved the tag and dropped nothing, but a
			// random image's blobs are per push: a manifest read a
			// moment before a move still names blobs the upstream has.
			return fmt.Errorf("blob %s of %s: 404", d, ref)
		}
		if err := want(resp, http.StatusOK); err != nil {
			return err
		}
		if b := readAll(resp); digest.FromString(b) != d {
			return fmt.Errorf("blob %s of %s: wrong bytes", d, ref)
		}
	}
	return nil
}

func readAll(resp *http.Response) string {
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// diskUse sums the sizes of the files under dir.
func diskUse(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			fi, err := d.Info()
			if err != nil {
				return err
			}
			n += fi.Size()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}
