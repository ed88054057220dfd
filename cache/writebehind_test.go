package cache

import (
	"os"
	"path/filepath"
	"sync"
	"testing"
)

func TestWriteBehindStartsWritebackInOrder(t *testing.T) {
	var mu sync.Mutex
	var ranges [][2]int64
	old := writeback
	writeback = func(fd uintptr, off, n int64) {
		mu.Lock()
		ranges = append(ranges, [2]int64{off, n})
		mu.Unlock()
		old(fd, off, n)
	}
	t.Cleanup(func() { writeback = old })

	f, err := os.Create(filepath.Join(t.TempDir(), "blob"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const from = 1000
	if _, err := f.Seek(from, 0); err != nil {
		t.Fatal(err)
	}
	w, wb := behind(f, f, from)
	chunk := make([]byte, 1<<20)
	for i := 0; i < 3*writeBehindEvery>>20; i++ {
		if _, err := w.Write(chunk); err != nil {
			t.Fatal(err)
		}
	}
	wb.stop()
	wb.stop()                                 // twice is fine
	if _, err := w.Write(chunk); err != nil { // after stop: only writes
		t.Fatal(err)
	}

	mu.Lock()
	defer mu.Unlock()
	if len(ranges) == 0 {
		t.Fatal("24 MiB written and no writeback started")
	}
	next := int64(from)
	for _, r := range ranges {
		if r[0] != next || r[1] <= 0 {
			t.Fatalf("writeback ranges %v are not contiguous from %d", ranges, from)
		}
		next = r[0] + r[1]
	}
	if next > from+3*writeBehindEvery {
		t.Errorf("writeback went to %d, past what was written before stop", next)
	}
}

func TestWriteBehindSmallWriteStartsNothing(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "blob"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, wb := behind(f, f, 0)
	if _, err := w.Write(make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	wb.stop()
	select {
	case <-wb.done:
		t.Error("a goroutine ran for a 4 KiB blob")
	default:
	}
}
