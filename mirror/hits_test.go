package mirror

import (
	"testing"
	"time"
)

func TestHitWindowOverFiveMinutesAndAnHour(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1_800_000_000, 0)}
	w := &hitWindow{now: clk.Now}
	if r := w.over(5 * time.Minute); r.Total != 0 || r.Ratio != nil {
		t.Fatalf("nothing counted yet: %+v", r)
	}
	// An hour ago: 10 misses. 30 minutes ago: 10 hits. Now: 3 hits, 1 miss.
	for range 10 {
		w.note(false)
	}
	clk.Advance(30 * time.Minute)
	for range 10 {
		w.note(true)
	}
	clk.Advance(30*time.Minute - 20*time.Second)
	for range 3 {
		w.note(true)
	}
	w.note(false)

	check := func(what string, r hitRatio, hits, total uint64) {
		t.Helper()
		if r.Hits != hits || r.Total != total || r.Ratio == nil || *r.Ratio != float64(hits)/float64(total) {
			t.Errorf("%s: %+v, want %d of %d", what, r, hits, total)
		}
	}
	check("5 minutes", w.over(5*time.Minute), 3, 4)
	check("1 hour, the first minute still in", w.over(time.Hour), 13, 24)
	clk.Advance(30 * time.Second) // the first slot is past the hour now
	check("1 hour later", w.over(time.Hour), 13, 14)
	clk.Advance(5 * time.Minute)
	if r := w.over(5 * time.Minute); r.Total != 0 || r.Ratio != nil {
		t.Errorf("5 quiet minutes: %+v", r)
	}
	check("still within the hour", w.over(time.Hour), 13, 14)

	// A slot's place in the ring is reused an hour later: the old counts go.
	clk.Advance(time.Hour)
	w.note(true)
	check("an hour after that", w.over(time.Hour), 1, 1)
	if r := w.over(100 * time.Hour); r.Total != 1 {
		t.Errorf("a window past an hour counts an hour: %+v", r)
	}
}
