package main

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/term"
)

// Progress output of prefetch and verify. On a terminal: bars drawn by
// mpb, which redraws them in place and reads the terminal's width on every
// frame, shortening the bar and then the text so that no line wraps (a
// wrapped line is what broke a hand-written redraw). Anywhere else (a CI
// log, a file, a pipe, /dev/null): plain lines, one per event, with no
// control characters.

// minBarColumns is the narrowest terminal that gets bars.
const minBarColumns = 40

// barTerminal reports whether w is a terminal to draw bars on: a
// character device is not enough (/dev/null is one), it must answer the
// terminal ioctls (golang.org/x/term), and say how wide it is.
func barTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return false
	}
	cols, _, err := term.GetSize(int(f.Fd()))
	return err == nil && cols >= minBarColumns
}

// prefetchProgress shows a bar per image being pulled on a terminal, and
// each image's summary line when it ends, above the bars there and alone
// anywhere else.
type prefetchProgress struct {
	w io.Writer
	p *mpb.Progress // nil: plain lines

	mu   sync.Mutex
	bars map[*prefetchJob]*mpb.Bar
	quit chan struct{}
	done chan struct{}
}

func newPrefetchProgress(w io.Writer) *prefetchProgress {
	pp := &prefetchProgress{w: w, bars: map[*prefetchJob]*mpb.Bar{}, quit: make(chan struct{}), done: make(chan struct{})}
	if !barTerminal(w) {
		close(pp.done)
		return pp
	}
	pp.p = mpb.New(mpb.WithOutput(w), mpb.WithRefreshRate(150*time.Millisecond))
	go pp.poll()
	return pp
}

// poll moves the bars to what the jobs have read.
func (pp *prefetchProgress) poll() {
	defer close(pp.done)
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		pp.mu.Lock()
		for j, b := range pp.bars {
			b.SetTotal(j.total.Load(), false)
			b.SetCurrent(j.read.Load())
		}
		pp.mu.Unlock()
		select {
		case <-t.C:
		case <-pp.quit:
			return
		}
	}
}

// started gives j a bar.
func (pp *prefetchProgress) started(j *prefetchJob) {
	if pp.p == nil {
		return
	}
	b := pp.p.New(0, mpb.BarStyle(),
		mpb.PrependDecorators(decor.Any(func(s decor.Statistics) string {
			// The name takes at most two fifths of the line.
			return trimName(j.image, max(s.AvailableWidth*2/5, 8))
		}, decor.WCSyncSpaceR)),
		mpb.AppendDecorators(decor.Any(func(s decor.Statistics) string {
			return sizeText(s.Current) + " / " + sizeText(s.Total)
		}, decor.WCSyncWidth)))
	pp.mu.Lock()
	pp.bars[j] = b
	pp.mu.Unlock()
}

// finished prints j's summary; on a terminal it goes above the bars, and
// j's bar goes away.
func (pp *prefetchProgress) finished(j *prefetchJob) {
	line := j.summary() + "\n"
	if pp.p == nil {
		pp.mu.Lock()
		io.WriteString(pp.w, line)
		pp.mu.Unlock()
		return
	}
	if _, err := pp.p.Write([]byte(line)); err != nil {
		// The display ended early (the terminal went away): the line
		// still goes out.
		pp.mu.Lock()
		io.WriteString(pp.w, line)
		pp.mu.Unlock()
	}
	pp.mu.Lock()
	b := pp.bars[j]
	delete(pp.bars, j)
	pp.mu.Unlock()
	if b != nil {
		b.Abort(true)
	}
}

// stop ends the display once every job has finished.
func (pp *prefetchProgress) stop() {
	close(pp.quit)
	<-pp.done
	if pp.p != nil {
		pp.p.Wait()
	}
}

func trimName(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return "…" + string(r[len(r)-n+1:])
}

// verifyProgress draws a bar with the throughput on a terminal, and a
// plain line every five seconds otherwise.
type verifyProgress struct {
	w     io.Writer
	start time.Time
	last  time.Time
	p     *mpb.Progress // nil: plain lines
	bar   *mpb.Bar
}

func newVerifyProgress(w io.Writer) *verifyProgress {
	vp := &verifyProgress{w: w, start: time.Now()}
	if !barTerminal(w) {
		return vp
	}
	vp.p = mpb.New(mpb.WithOutput(w), mpb.WithRefreshRate(200*time.Millisecond))
	vp.bar = vp.p.New(0, mpb.BarStyle(),
		mpb.PrependDecorators(decor.Name("verify", decor.WCSyncSpaceR), decor.Percentage(decor.WCSyncSpace)),
		mpb.AppendDecorators(decor.Any(func(s decor.Statistics) string {
			return fmt.Sprintf("%s / %s  %s/s", sizeText(s.Current), sizeText(s.Total), sizeText(vp.rate(s.Current)))
		})))
	return vp
}

func (vp *verifyProgress) rate(done int64) int64 {
	return int64(float64(done) / max(time.Since(vp.start).Seconds(), 1e-3))
}

func (vp *verifyProgress) update(done, total int64) {
	if vp.p != nil {
		vp.bar.SetTotal(total, false)
		vp.bar.SetCurrent(done)
		return
	}
	now := time.Now()
	if now.Sub(vp.last) < 5*time.Second && done < total {
		return
	}
	vp.last = now
	frac := 1.0
	if total > 0 {
		frac = float64(done) / float64(total)
	}
	fmt.Fprintf(vp.w, "verify: %3.0f%% %s of %s, %s/s\n", frac*100, sizeText(done), sizeText(total), sizeText(vp.rate(done)))
}

// done ends the display: the bar stays, complete.
func (vp *verifyProgress) done() {
	if vp.p == nil {
		return
	}
	vp.bar.SetTotal(-1, true)
	vp.p.Wait()
}
