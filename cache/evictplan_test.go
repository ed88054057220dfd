package cache

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// The selection a plan makes keeps, of what it was offered after its
// cursor, the shortest run of least recently used candidates that frees
// the bytes needed, or as many as it may hold: checked against sorting
// everything, with ties in last use, empty blobs and digests of another
// algorithm.
func TestSelectionKeepsTheOldestThatSuffice(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for round := range 2000 {
		var all []candidate
		var names [][]byte
		for i := range r.IntN(60) {
			d := digest.SHA256.FromString(fmt.Sprint(round, i))
			if r.IntN(8) == 0 {
				d = digest.SHA512.FromString(fmt.Sprint(round, i))
			}
			name := []byte(d)
			c := newCandidate(name, kindBlob, int64(r.IntN(5)*100), int64(r.IntN(20)))
			if c.digest() != d {
				t.Fatalf("candidate of %s holds %s", d, c.digest())
			}
			all, names = append(all, c), append(names, name)
		}
		need := int64(r.IntN(3000)) + 1
		sel := selection{need: need, max: 1 + r.IntN(30)}
		sorted := slices.SortedFunc(slices.Values(all), candidate.compare)
		if len(sorted) > 0 && r.IntN(3) == 0 {
			sel.after = &sorted[r.IntN(len(sorted))]
		}
		for i, c := range all {
			sel.offer(names[i], c.k, c.size, c.at)
		}
		var want []candidate
		var sum int64
		for _, c := range sorted {
			if sel.after != nil && c.compare(*sel.after) <= 0 {
				continue
			}
			if sum >= need || len(want) == sel.max {
				break
			}
			want, sum = append(want, c), sum+c.size
		}
		got := sel.oldestFirst()
		if !slices.Equal(got, want) {
			t.Fatalf("round %d (need %d, max %d): kept %d candidates, want %d", round, need, sel.max, len(got), len(want))
		}
		if cut := len(want) == sel.max && sum < need; sel.cut() != cut {
			t.Fatalf("round %d: cut %v, want %v", round, sel.cut(), cut)
		}
	}
}

// A pass that must remove more than one plan holds plans again, after
// where the last plan ended: a dry run reports the whole of it, and the
// pass removes the least recently used, whatever their digest algorithm,
// leaving what a reader holds open.
func TestEvictionPlansInRoundsPastTheBound(t *testing.T) {
	clk := &clock{now: time.Unix(1_700_000_000, 0)}
	s := openLife(t, t.TempDir(), Options{Now: clk.Now})
	s.life.planMax = 2
	var blobs []digest.Digest
	for i := range 9 {
		clk.Add(time.Minute)
		b, d := blobOf(i, 1000)
		if i == 2 {
			d = digest.SHA512.FromBytes(b)
		}
		if err := s.PutBlob(bytes.NewReader(b), d, OriginPulled); err != nil {
			t.Fatal(err)
		}
		blobs = append(blobs, d)
	}
	f, _, err := s.OpenBlob(blobs[1])
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	r, err := s.Evict(4000, true)
	if err != nil || r.Blobs != 5 || r.Bytes != 5000 || !has(s, blobs[0]) {
		t.Fatalf("dry run: %+v %v", r, err)
	}
	r, err = s.Evict(4000, false)
	if err != nil || r.Blobs != 5 || s.Stats().Bytes != 4000 {
		t.Fatalf("pass: %+v %v, %d bytes left", r, err, s.Stats().Bytes)
	}
	for i, d := range blobs {
		if want := i == 1 || i > 5; has(s, d) != want {
			t.Errorf("blob %d (%s): stored %v, want %v", i, d.Algorithm(), !want, want)
		}
	}
}

// Stats ask what the next pass would do without reading the index or
// waiting for a pass: nothing under the high mark; past it, what the last
// pass toward the budget planned, and when.
func TestEvictPlanIsTheLastBudgetPlanAndNeverWaits(t *testing.T) {
	clk := &clock{now: time.Unix(1_700_000_000, 0)}
	s := openLife(t, t.TempDir(), Options{Now: clk.Now, MaxSize: 10_000, LowWatermark: 0.5, HighWatermark: 0.9})
	s.life.onGrowth = nil // passes run when the test asks
	put(t, s, bytes.Repeat([]byte("P"), 9500), OriginPushed)
	if p := s.EvictPlan(); p.Before != 9500 || p.Target != 5000 || p.Blobs != 0 || !p.Planned.IsZero() {
		t.Errorf("under the high mark: %+v", p)
	}
	for i := range 3 {
		clk.Add(time.Minute)
		b, _ := blobOf(i, 200)
		put(t, s, b, OriginPulled)
	}
	if p := s.EvictPlan(); p.Before != 10_100 || p.Blobs != 0 || !p.Planned.IsZero() {
		t.Errorf("past the high mark, before any pass: %+v", p)
	}
	b, _ := json.Marshal(s.EvictPlan())
	if bytes.Contains(b, []byte("planned_at")) {
		t.Errorf("no plan yet, yet %s", b)
	}

	planned := clk.Now()
	if r, err := s.EvictToBudget(); err != nil || r.Blobs != 3 {
		t.Fatalf("pass: %+v %v", r, err)
	}
	clk.Add(time.Minute)
	// Still past the high mark: pushed content stays.
	p := s.EvictPlan()
	if p.Before != 10_100 || p.Target != 5000 || p.Blobs != 3 || p.Bytes != 600 || !p.Planned.Equal(planned) {
		t.Errorf("after a pass: %+v, want the plan of 3 blobs made at %s", p, planned)
	}

	s.life.pass.Lock() // a long pass
	done := make(chan EvictReport)
	go func() { done <- s.EvictPlan() }()
	select {
	case p := <-done:
		if p.Blobs != 3 {
			t.Errorf("during a pass: %+v", p)
		}
	case <-time.After(waitLong):
		t.Error("EvictPlan waited for the pass")
	}
	s.life.pass.Unlock()

	if r, err := s.EvictToBudget(); err != nil || r.Blobs != 0 {
		t.Fatalf("a pass with nothing left to evict: %+v %v", r, err)
	}
	if p := s.EvictPlan(); p.Blobs != 0 || p.Before != 9500 || !p.Planned.Equal(clk.Now()) {
		t.Errorf("after a pass that found nothing: %+v", p)
	}
}
