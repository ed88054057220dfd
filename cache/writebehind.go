package cache

import (
	"io"
	"os"
	"sync"
	"sync/atomic"
)

// Write-behind: a blob's bytes are handed to the disk while the rest are
// still arriving, so that the fsync that commits them finds little left
// to do. Without it the disk idles while a push or fill streams in, then
// the network idles while one fsync writes everything; with it the two
// overlap. It runs on its own goroutine, started once a blob passes
// writeBehindEvery, so a writer never waits for the disk here.

const writeBehindEvery = 8 << 20

var writeback = startWriteback // tests watch it

type writeBehind struct {
	f    *os.File
	end  atomic.Int64 // file offset written up to
	last int64        // end at the last kick; the writer's own
	from int64        // where writing started

	start sync.Once
	kick  chan struct{} // never closed: a late Write must not panic
	stopd sync.Once
	quit  chan struct{}
	done  chan struct{}
}

// behind wraps w, which writes f from offset from on.
func behind(w io.Writer, f *os.File, from int64) (io.Writer, *writeBehind) {
	wb := &writeBehind{f: f, last: from, from: from, kick: make(chan struct{}, 1), quit: make(chan struct{}), done: make(chan struct{})}
	wb.end.Store(from)
	return behindWriter{w, wb}, wb
}

type behindWriter struct {
	w  io.Writer
	wb *writeBehind
}

func (b behindWriter) Write(p []byte) (int, error) {
	n, err := b.w.Write(p)
	b.wb.wrote(int64(n))
	return n, err
}

func (wb *writeBehind) wrote(n int64) {
	end := wb.end.Add(n)
	if end-wb.last < writeBehindEvery {
		return
	}
	wb.last = end
	wb.start.Do(func() { go wb.run() })
	select {
	case wb.kick <- struct{}{}:
	default: // a kick is pending; it will see the new end
	}
}

func (wb *writeBehind) run() {
	defer close(wb.done)
	raw, err := wb.f.SyscallConn()
	if err != nil {
		return
	}
	flushed := wb.from
	for {
		select {
		case <-wb.quit:
			return
		case <-wb.kick:
		}
		end := wb.end.Load()
		if end > flushed {
			raw.Control(func(fd uintptr) { writeback(fd, flushed, end-flushed) })
			flushed = end
		}
	}
}

// stop ends the write-behind and waits for it; call it before the fsync
// or the close of the file. It may be called more than once, and a Write
// after it only writes.
func (wb *writeBehind) stop() {
	if wb == nil {
		return
	}
	wb.stopd.Do(func() {
		close(wb.quit)
		started := true
		wb.start.Do(func() { started = false })
		if started {
			<-wb.done
		}
	})
}
