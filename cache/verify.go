package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// VerifyOptions tune Verify.
type VerifyOptions struct {
	// Quick checks that each file is there with the indexed size, and
	// hashes nothing.
	Quick bool
	// Progress, if set, is called now and then with the bytes checked so
	// far and the total; from one goroutine at a time.
	Progress func(done, total int64)
	// Workers hash in parallel; default min(4, GOMAXPROCS).
	Workers int
}

// Problem is one blob Verify found wrong.
type Problem struct {
	Digest digest.Digest `json:"digest"`
	Origin string        `json:"origin"`
	Size   int64         `json:"size"`
	Error  string        `json:"error"`
	// Action: "removed" (a pulled blob: the next pull refills it) or
	// "quarantined" (a pushed blob: its bytes were moved to quarantine/,
	// and it must be pushed again).
	Action string `json:"action"`
}

// VerifyReport is what Verify found.
type VerifyReport struct {
	Blobs    int           `json:"blobs"`
	Bytes    int64         `json:"bytes"`
	Problems []Problem     `json:"problems"`
	Dur      time.Duration `json:"duration_ns"`
	Quick    bool          `json:"quick"`
}

// OK reports whether nothing was wrong.
func (r VerifyReport) OK() bool { return len(r.Problems) == 0 }

// Verify re-hashes every indexed blob (or, Quick, checks presence and size)
// and takes the bad ones out of the index: a pulled blob is removed, so the
// next pull fills it again; a pushed blob cannot be refilled, so its file is
// moved to quarantine/ and it is logged as an error. It is safe on a running
// store.
func (s *Store) Verify(ctx context.Context, o VerifyOptions) (VerifyReport, error) {
	start := time.Now()
	if o.Workers <= 0 {
		o.Workers = min(4, runtime.GOMAXPROCS(0))
	}
	var list []BlobInfo
	var total int64
	err := s.ix.view(func(txn *badger.Txn) error {
		return each(txn, keyAll(prefixBlob), nil, false, func(item *badger.Item) error {
			d := digestKey(item.Key())
			return item.Value(func(v []byte) error {
				info, err := decodeBlob(d, v)
				if err != nil {
					info = BlobInfo{Digest: d, Size: -1}
				}
				list = append(list, info)
				total += max(info.Size, 0)
				return nil
			})
		})
	})
	if err != nil {
		return VerifyReport{}, err
	}
	r := VerifyReport{Blobs: len(list), Bytes: total, Quick: o.Quick}

	var done atomic.Int64
	var mu sync.Mutex
	var bad []BlobInfo
	var whys []error
	jobs := make(chan BlobInfo)
	var wg sync.WaitGroup
	for range o.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 1<<20)
			for info := range jobs {
				if err := s.checkBlob(info, o.Quick, buf, &done); err != nil {
					mu.Lock()
					bad, whys = append(bad, info), append(whys, err)
					mu.Unlock()
				}
			}
		}()
	}
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
feed:
	for _, info := range list {
		for {
			select {
			case jobs <- info:
				continue feed
			case <-tick.C:
				if o.Progress != nil {
					o.Progress(done.Load(), total)
				}
			case <-ctx.Done():
				break feed
			}
		}
	}
	close(jobs)
	wg.Wait()
	if o.Progress != nil {
		o.Progress(done.Load(), total)
	}
	if err := ctx.Err(); err != nil {
		return r, err
	}
	for i, info := range bad {
		p := Problem{Digest: info.Digest, Origin: info.Origin.String(), Size: info.Size, Error: whys[i].Error()}
		if err := s.dropBad(info, &p); err != nil {
			return r, err
		}
		r.Problems = append(r.Problems, p)
	}
	r.Dur = time.Since(start)
	return r, nil
}

var errSizeOnDisk = errors.New("size on disk differs from the index")

// checkBlob checks one blob's file against its entry.
func (s *Store) checkBlob(info BlobInfo, quick bool, buf []byte, done *atomic.Int64) error {
	if info.Size < 0 {
		return errCorruptValue
	}
	f, err := os.Open(s.blobPath(info.Digest))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return errors.New("file is missing")
		}
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if fi.Size() != info.Size {
		done.Add(info.Size)
		return fmt.Errorf("%w: %d bytes, want %d", errSizeOnDisk, fi.Size(), info.Size)
	}
	if quick {
		done.Add(info.Size)
		return nil
	}
	if !info.Digest.Algorithm().Available() {
		return digest.ErrDigestUnsupported
	}
	h := info.Digest.Algorithm().Hash()
	for {
		n, err := f.Read(buf)
		h.Write(buf[:n])
		done.Add(int64(n))
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
	}
	if got := digest.NewDigest(info.Digest.Algorithm(), h); got != info.Digest {
		return fmt.Errorf("%w: file hashes to %s", ErrDigestMismatch, got)
	}
	return nil
}

// dropBad takes a bad blob out of the index, if it is still the entry that
// was checked (a fill may have replaced it meanwhile).
func (s *Store) dropBad(info BlobInfo, p *Problem) error {
	unlock := s.locks.Lock(string(info.Digest))
	defer unlock()
	cur, err := s.StatBlob(info.Digest)
	if errors.Is(err, ErrNotFound) {
		p.Action = "gone"
		return nil
	}
	if errors.Is(err, errCorruptValue) {
		// An unreadable entry: nothing to keep. The running total never
		// counted it, so only the key goes.
		p.Action = "removed"
		return s.ix.update(func(txn *badger.Txn) error { return txn.Delete(keyBlob(info.Digest)) })
	}
	if err != nil {
		return err
	}
	if info.Size >= 0 && !cur.StoredAt.Equal(info.StoredAt) {
		p.Action = "replaced meanwhile"
		return nil
	}
	if cur.Origin == OriginPushed {
		q := filepath.Join(s.dir, "quarantine")
		os.MkdirAll(q, 0o755)
		if err := os.Rename(s.blobPath(info.Digest), filepath.Join(q, info.Digest.Encoded())); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("cache: quarantine %s: %w", info.Digest, err)
		}
		p.Action = "quarantined"
		s.log.Error("a pushed blob is corrupt or missing: it was taken out of the index and must be pushed again",
			"digest", info.Digest, "bytes", info.Size, "err", p.Error)
	} else {
		p.Action = "removed"
		s.log.Warn("a cached blob is corrupt or missing: removed, the next pull refills it", "digest", info.Digest, "err", p.Error)
	}
	// Taken out as an eviction would: the repositories keep their links,
	// so a pull refills a pulled blob, and a push of a pushed one makes
	// it whole again.
	var rm removed
	err = s.ix.update(func(txn *badger.Txn) error {
		var err error
		rm, err = dropBlob(txn, cur, false)
		return err
	})
	if err != nil {
		return err
	}
	if p.Action == "quarantined" {
		rm.bytes, rm.kind = cur.Size, kindBlob // the file is in quarantine/ now: finish finds none
	}
	s.finish(rm)
	return nil
}
