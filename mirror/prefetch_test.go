package mirror

import (
	"bytes"
	"encoding/json"
	"net/http"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

func postPrefetchReq(t *testing.T, url string, body any) (int, []PrefetchResult) {
	t.Helper()
	b, _ := json.Marshal(body)
	resp, err := http.Post(url, "application/json", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		Results []PrefetchResult `json:"results"`
	}
	json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, out.Results
}

// POST /v2/_slipway/prefetch stores every platform of an index; a second
// call finds everything cached and asks the upstream for no blob.
func TestAdminPrefetchMultiArch(t *testing.T) {
	e := newOpsEnv(t, nil)
	idx, err := random.Index(8<<10, 2, 3)
	if err != nil {
		t.Fatal(err)
	}
	ref, _ := name.ParseReference(e.up.host + "/team/multi:v1")
	if err := remote.WriteIndex(ref, idx); err != nil {
		t.Fatal(err)
	}
	img, _ := random.Image(1024, 1)
	e.up.pushImageTo(t, img, "team/single:v1")
	url := e.url("/v2/_slipway/prefetch")
	images := map[string]any{"images": []string{"up/team/multi:v1", "up/team/single"}}
	e.up.pushImageTo(t, img, "team/single:latest")

	status, res := postPrefetchReq(t, url, images)
	if status != http.StatusOK || len(res) != 2 {
		t.Fatalf("prefetch: %d %+v", status, res)
	}
	if r := res[0]; r.Manifests != 4 || r.Blobs != 9 || r.Fetched != 13 || r.Cached != 0 || r.Error != "" {
		t.Errorf("cold prefetch of the index: %+v, want 4 manifests and 9 blobs fetched", r)
	}
	if n := e.up.countPrefix("GET", "/v2/team/multi/blobs/"); n != 9 {
		t.Errorf("%d upstream blob GETs, want 9 (3 platforms x config + 2 layers)", n)
	}
	status, res = postPrefetchReq(t, url, images)
	if status != http.StatusOK {
		t.Fatalf("second prefetch: %d %+v", status, res)
	}
	for _, r := range res {
		if r.Fetched != 0 || r.Cached == 0 {
			t.Errorf("second prefetch of %s: %+v, want everything cached", r.Image, r)
		}
	}
	if n := e.up.countPrefix("GET", "/v2/team/multi/blobs/"); n != 9 {
		t.Errorf("second prefetch made %d more upstream blob GETs", n-9)
	}

	status, res = postPrefetchReq(t, url, map[string]any{"images": []string{"up/team/missing:v1", "up/team/multi:v1"}})
	if status != http.StatusBadGateway || res[0].Error == "" || res[1].Error != "" {
		t.Errorf("prefetch with a missing image: %d %+v, want 502 with that image's error", status, res)
	}
	for _, body := range []any{map[string]any{}, "x", map[string]any{"images": []string{"a"}, "platform": "///"}} {
		if status, _ := postPrefetchReq(t, url, body); status != http.StatusBadRequest {
			t.Errorf("prefetch %v: %d, want 400", body, status)
		}
	}
}
