package cache

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// Benchmarks of the lifecycle at scale; not run in CI. The index size is
// SLIPWAY_BENCH_ENTRIES (default 1,000,000):
//
//	go test -run '^$' -bench 'Eviction|Recovery|Stats' -benchtime 1x ./cache
func benchEntries() int {
	if n, err := strconv.Atoi(os.Getenv("SLIPWAY_BENCH_ENTRIES")); err == nil && n > 0 {
		return n
	}
	return 1_000_000
}

func benchDigest(i int) digest.Digest {
	h := sha256.Sum256(binary.BigEndian.AppendUint64(nil, uint64(i)))
	return digest.NewDigestFromEncoded(digest.SHA256, hex.EncodeToString(h[:]))
}

// fillIndex writes n pulled blob entries (1 MiB each, stored an hour
// apart in a random order) and an access time for every other one.
func fillIndex(b *testing.B, s *Store, n int) {
	wb := s.ix.db.NewWriteBatch()
	base := time.Unix(1_700_000_000, 0)
	for i := range n {
		d := benchDigest(i)
		at := base.Add(time.Duration(i*7919%n) * time.Second)
		if err := wb.Set(keyBlob(d), encodeBlob(BlobInfo{Digest: d, Size: 1 << 20, Origin: OriginPulled, StoredAt: at})); err != nil {
			b.Fatal(err)
		}
		if i%2 == 0 {
			wb.Set(keyAccess(d), binary.BigEndian.AppendUint64(nil, uint64(at.Add(time.Hour).UnixNano())))
		}
	}
	if err := wb.Flush(); err != nil {
		b.Fatal(err)
	}
}

// settle waits until badger has let go of what a bulk load made it hold:
// after the memtable flushes and compactions that fillIndex causes, its
// pool of table builders keeps about 60 MiB per builder and frees one
// every two seconds in which no flush or compaction took one. Without this
// wait a benchmark measures that pool (up to 270 MiB at 1M entries), not
// what it runs. It waits for five seconds without change, at most two
// minutes.
func settle(b *testing.B) {
	start := time.Now()
	var last uint64
	for still := 0; still < 5 && time.Since(start) < 2*time.Minute; time.Sleep(time.Second) {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		if last != 0 && m.HeapInuse+last/64 >= last { // not smaller by more than 1/64
			still++
		} else {
			still = 0
		}
		last = m.HeapInuse
	}
	b.Logf("badger settled at %.1f MiB of heap after %s", float64(last)/(1<<20), time.Since(start).Round(time.Second))
}

// peakHeap samples the heap in use while fn runs.
func peakHeap(fn func()) uint64 {
	runtime.GC()
	var peak atomic.Uint64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		var m runtime.MemStats
		for {
			runtime.ReadMemStats(&m)
			if m.HeapInuse > peak.Load() {
				peak.Store(m.HeapInuse)
			}
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	fn()
	close(stop)
	wg.Wait()
	return peak.Load()
}

// One eviction pass over n entries that must free 10% of the bytes.
func BenchmarkEvictionPass(b *testing.B) {
	n := benchEntries()
	s, err := Open(b.TempDir(), Options{MaxSize: int64(n) << 20, GCEvery: -1, MaintenanceInterval: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	fillIndex(b, s, n)
	settle(b)
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		s.life.size.Store(int64(n) << 20)
		b.StartTimer()
		var r EvictReport
		peak := peakHeap(func() {
			r, err = s.Evict(int64(n)<<20*9/10, true)
		})
		if err != nil || r.Blobs != n/10 {
			b.Fatalf("%+v %v", r, err)
		}
		b.ReportMetric(float64(peak)/(1<<20), "peak-heap-MiB")
	}
}

// Stats as GET /v2/_slipway/stats serves them (the running totals and
// what the next eviction pass would do) with n entries, the store past its
// high mark and no pass running.
func BenchmarkStats(b *testing.B) {
	n := benchEntries()
	s, err := Open(b.TempDir(), Options{MaxSize: int64(n) << 20, GCEvery: -1, MaintenanceInterval: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	fillIndex(b, s, n)
	settle(b)
	s.life.size.Store(int64(n) << 20)
	s.life.count.Store(int64(n))
	var st Stats
	peak := peakHeap(func() {
		b.ResetTimer() // the calls alone, not peakHeap's GC
		for range b.N {
			st = s.Stats()
			s.EvictPlan()
		}
		b.StopTimer()
	})
	if st.Bytes <= st.HighWatermark {
		b.Fatalf("%d bytes: not past the high mark", st.Bytes)
	}
	b.ReportMetric(float64(peak)/(1<<20), "peak-heap-MiB")
}

// Startup with n indexed blobs whose files are all there.
func BenchmarkStartupRecovery(b *testing.B) {
	n := benchEntries()
	dir := b.TempDir()
	s, err := Open(dir, Options{GCEvery: -1})
	if err != nil {
		b.Fatal(err)
	}
	fillIndex(b, s, n)
	s.Close()
	// Empty files: recovery does not read them.
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 8 {
				d := benchDigest(i)
				p := filepath.Join(dir, "blobs", "sha256", d.Encoded()[:2], d.Encoded())
				os.MkdirAll(filepath.Dir(p), 0o755)
				os.WriteFile(p, nil, 0o644)
			}
		}()
	}
	wg.Wait()
	b.ResetTimer()
	for range b.N {
		var st Stats
		peak := peakHeap(func() {
			s, err = Open(dir, Options{GCEvery: -1})
			if err != nil {
				b.Fatal(err)
			}
			st = s.Stats()
		})
		b.StopTimer()
		s.Close()
		b.StartTimer()
		if st.Blobs != int64(n) {
			b.Fatalf("%d blobs after recovery, want %d", st.Blobs, n)
		}
		b.ReportMetric(float64(peak)/(1<<20), "peak-heap-MiB")
	}
}

// Verify's hashing throughput over 256 MiB in 64 files; compare with
// sha256sum on the same files (the benchmark logs the command).
func BenchmarkVerify(b *testing.B) {
	dir := b.TempDir()
	s, err := Open(dir, Options{GCEvery: -1})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	buf := make([]byte, 4<<20)
	for i := range 64 {
		binary.BigEndian.PutUint64(buf, uint64(i))
		for j := 8; j < len(buf); j += 4096 {
			buf[j] = byte(i + j)
		}
		d := digest.FromBytes(buf)
		if err := s.PutBlob(bytes.NewReader(buf), d, OriginPulled); err != nil {
			b.Fatal(err)
		}
	}
	b.Logf("compare: time sha256sum %s/blobs/sha256/*/*", dir)
	b.SetBytes(64 * 4 << 20)
	b.ResetTimer()
	for range b.N {
		r, err := s.Verify(b.Context(), VerifyOptions{})
		if err != nil || !r.OK() {
			b.Fatal(err, r.Problems)
		}
	}
}
