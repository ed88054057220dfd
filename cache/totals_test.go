package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// recount adds up the blobs and manifests in the index, reading every
// value: what the running totals must equal.
func recount(t *testing.T, s *Store) Stats {
	t.Helper()
	var st Stats
	err := s.ix.view(func(txn *badger.Txn) error {
		err := each(txn, keyAll(prefixBlob), nil, true, func(item *badger.Item) error {
			return item.Value(func(v []byte) error {
				info, err := decodeBlob(digestKey(item.Key()), v)
				if err != nil {
					return err
				}
				st.Blobs++
				st.BlobBytes += info.Size
				return nil
			})
		})
		if err != nil {
			return err
		}
		return each(txn, keyAll(prefixManifest), nil, true, func(item *badger.Item) error {
			return item.Value(func(v []byte) error {
				m, err := decodeManifest(digestKey(item.Key()), v)
				if err != nil {
					return err
				}
				st.Manifests++
				st.ManifestBytes += int64(len(m.Bytes))
				return nil
			})
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	st.Bytes = st.BlobBytes + st.ManifestBytes
	return st
}

func sameTotals(t *testing.T, when string, got, want Stats) {
	t.Helper()
	if got.Blobs != want.Blobs || got.BlobBytes != want.BlobBytes || got.Manifests != want.Manifests ||
		got.ManifestBytes != want.ManifestBytes || got.Bytes != want.Bytes {
		t.Errorf("%s: running totals %d blobs (%d bytes), %d manifests (%d bytes); the index holds %d blobs (%d bytes), %d manifests (%d bytes)",
			when, got.Blobs, got.BlobBytes, got.Manifests, got.ManifestBytes,
			want.Blobs, want.BlobBytes, want.Manifests, want.ManifestBytes)
	}
}

// The running totals that stats report and eviction budgets by stay equal
// to a count of the index while fills, pushes, manifest puts, tag deletes,
// GC, eviction (explicit and the maintenance loop's) and verify's repairs
// race over the same few digests; and startup recovery rebuilds them equal
// to a count of the index it opened.
func TestRunningTotalsMatchTheIndexUnderConcurrentChange(t *testing.T) {
	dir := t.TempDir()
	o := Options{MaxSize: 24_000, LowWatermark: 0.5, HighWatermark: 0.8, GCGrace: time.Nanosecond, MinGCGrace: -1,
		GCEvery: -1, MaintenanceInterval: 5 * time.Millisecond}
	s, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()

	var blobs [][]byte
	for i := range 24 {
		b, _ := blobOf(i, 100+37*i)
		blobs = append(blobs, b)
	}
	pick := func(r *rand.Rand) []byte { return blobs[r.IntN(len(blobs))] }
	manifest := func(r *rand.Rand) []byte { return manifestOf(pick(r), pick(r), pick(r)) }
	ok := func(err error) bool {
		return err == nil || errors.Is(err, ErrRefUnknown) || errors.Is(err, ErrRefSize) || errors.Is(err, ErrNotFound)
	}

	const rounds = 60
	writers := []func(r *rand.Rand) error{
		func(r *rand.Rand) error { // a fill
			b := pick(r)
			return s.PutBlob(bytes.NewReader(b), digest.FromBytes(b), OriginPulled)
		},
		func(r *rand.Rand) error { // a push of a blob, linked in a local repository
			b := pick(r)
			d := digest.FromBytes(b)
			if err := s.PutBlob(bytes.NewReader(b), d, OriginPushed); err != nil {
				return err
			}
			return s.Link("", "app", d)
		},
		func(r *rand.Rand) error { // a pulled manifest, tagged
			m := manifest(r)
			return s.PutManifest(ManifestPut{NS: "up.example", Repo: "lib/app", Tags: []string{fmt.Sprint("t", r.IntN(4))},
				Manifest: Manifest{Digest: digest.FromBytes(m), MediaType: ociManifest, Bytes: m, Origin: OriginPulled}})
		},
		func(r *rand.Rand) error { // a pushed manifest (refused when GC took what it holds)
			m := manifest(r)
			return s.PutManifest(ManifestPut{Repo: "app", Local: true, Tags: []string{fmt.Sprint("v", r.IntN(4))},
				Manifest: Manifest{Digest: digest.FromBytes(m), MediaType: ociManifest, Bytes: m, Origin: OriginPushed}})
		},
		func(r *rand.Rand) error { // a tag goes away
			return s.DeleteTag("up.example", "lib/app", fmt.Sprint("t", r.IntN(4)))
		},
	}
	// Passes and readers run until the writers are done.
	passes := []func(r *rand.Rand) error{
		func(r *rand.Rand) error { // GC
			_, err := s.GC(GCOptions{})
			return err
		},
		func(r *rand.Rand) error { // eviction, of about half
			_, err := s.Evict(s.Stats().Bytes/2, false)
			return err
		},
		func(r *rand.Rand) error { // a blob file goes missing; verify takes its entry out
			os.Remove(s.blobPath(digest.FromBytes(pick(r))))
			_, err := s.Verify(context.Background(), VerifyOptions{Quick: true})
			return err
		},
		func(r *rand.Rand) error { // readers of the totals
			s.Stats()
			s.EvictPlan()
			return nil
		},
	}
	var writing, passing sync.WaitGroup
	errs := make(chan error, len(writers)+len(passes))
	stop := make(chan struct{})
	run := func(wg *sync.WaitGroup, seed int, work func(*rand.Rand) error, more func(round int) bool) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(seed), 1))
			for round := 0; more(round); round++ {
				if err := work(r); !ok(err) {
					errs <- fmt.Errorf("worker %d: %w", seed, err)
					return
				}
			}
		}()
	}
	for i, w := range writers {
		run(&writing, i, w, func(round int) bool { return round < rounds })
	}
	for i, p := range passes {
		run(&passing, len(writers)+i, p, func(int) bool {
			select {
			case <-stop:
				return false
			default:
				time.Sleep(time.Millisecond)
				return true
			}
		})
	}
	writing.Wait()
	close(stop)
	passing.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if _, err := s.Verify(context.Background(), VerifyOptions{Quick: true}); err != nil {
		t.Fatal(err)
	}
	// One manifest at least, stored after the race, to count at startup.
	if err := writers[2](rand.New(rand.NewPCG(0, 0))); err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st.Evicted == 0 {
		t.Errorf("nothing was evicted: the test did not race eviction (%+v)", st)
	}

	s.life.pass.Lock() // no pass between a removal and its totals
	sameTotals(t, "running", s.Stats(), recount(t, s))
	s.life.pass.Unlock()

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	o.MaxSize = 0 // nothing evicted while the counts are compared
	s, err = Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	sameTotals(t, "after recovery", s.Stats(), recount(t, s))
}
