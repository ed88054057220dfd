package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// slipway prefetch of a multi-arch index: --platform fills one platform;
// without it every platform; a second run reports everything cached and
// costs the upstream no blob GET; a missing image fails the run.
func TestPrefetchMultiArch(t *testing.T) {
	t.Parallel()
	up := newCountingUpstream(t)
	idx := mutate.IndexMediaType(empty.Index, "application/vnd.oci.image.index.v1+json")
	for _, arch := range []string{"amd64", "arm64", "riscv64"} {
		img, err := random.Image(16<<10, 2)
		if err != nil {
			t.Fatal(err)
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img,
			Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: arch}}})
	}
	ref, _ := name.ParseReference(up.host+"/team/multi:v1", name.Insecure)
	if err := remote.WriteIndex(ref, idx); err != nil {
		t.Fatal(err)
	}
	single, _ := random.Image(8<<10, 1)
	if err := crane.Push(single, up.host+"/team/single:v1", crane.Insecure); err != nil {
		t.Fatal(err)
	}

	addr := freeAddr(t)
	p := start(t, nil, "serve", "--listen", addr, "--upstream", up.url, "--data-dir", t.TempDir(), "--tag-ttl", "1h")
	p.waitReady(t, addr)
	server := "--server=http://" + addr

	code, out, errOut := runOnce(t, nil, "prefetch", server, "--platform", "linux/arm64", "team/multi:v1")
	if code != 0 || !strings.Contains(out, "prefetched 1 of 1 images") {
		t.Fatalf("prefetch --platform: exit %d\n%s%s", code, out, errOut)
	}
	if n := up.blobGETs("team/multi"); n != 3 {
		t.Errorf("prefetch --platform linux/arm64 made %d upstream blob GETs, want 3 (config + 2 layers)", n)
	}

	list := filepath.Join(t.TempDir(), "images.txt")
	os.WriteFile(list, []byte("# base images\nteam/multi:v1\n\nteam/single:v1  # the app\n"), 0o644)
	code, out, errOut = runOnce(t, nil, "prefetch", server, "--concurrency", "2", "-f", list)
	if code != 0 || !strings.Contains(out, "prefetched 2 of 2 images") || !strings.Contains(out, "0 were already cached") {
		t.Fatalf("prefetch -f: exit %d\n%s%s", code, out, errOut)
	}
	if !strings.Contains(errOut, "team/multi:v1: 3 platforms, 9 blobs") || !strings.Contains(errOut, "fetched") {
		t.Errorf("per-image lines:\n%s", errOut)
	}
	if n := up.blobGETs("team/multi"); n != 9 {
		t.Errorf("after prefetching every platform: %d upstream blob GETs, want 9 (each blob once)", n)
	}

	code, out, errOut = runOnce(t, nil, "prefetch", server, "team/multi:v1", "team/single:v1")
	if code != 0 || !strings.Contains(out, "2 were already cached") || strings.Count(errOut, "all cached") != 2 {
		t.Errorf("second prefetch: exit %d, want everything reported cached\n%s%s", code, out, errOut)
	}
	if n := up.blobGETs("team/multi") + up.blobGETs("team/single"); n != 9+2 {
		t.Errorf("second prefetch made upstream blob GETs: %d in all, want 11", n)
	}

	code, out, errOut = runOnce(t, nil, "prefetch", server, "team/missing:v1", "team/single:v1")
	if code != 1 || !strings.Contains(out, "1 failed") || !strings.Contains(errOut, "team/missing:v1: FAILED") {
		t.Errorf("prefetch of a missing image: exit %d, want 1\n%s%s", code, out, errOut)
	}
	if code, _, _ := runOnce(t, nil, "prefetch", server); code != 2 {
		t.Errorf("prefetch without images: exit %d, want 2", code)
	}
	p.stop(t, syscall.SIGTERM, 10*time.Second)
}

// slipway prefetch and POST /v2/_slipway/prefetch read an image name the
// same way: each form below works in both or fails in both (the CLI with
// exit 2 before any pull, the API with a 400 OCI error).
func TestPrefetchReferencesAsTheAPIReadsThem(t *testing.T) {
	t.Parallel()
	up := newCountingUpstream(t)
	single, _ := random.Image(8<<10, 1)
	if err := crane.Push(single, up.host+"/team/single:v1", crane.Insecure); err != nil {
		t.Fatal(err)
	}
	d, _ := single.Digest()
	addr := freeAddr(t)
	p := start(t, nil, "serve", "--listen", addr, "--upstream", up.url, "--data-dir", t.TempDir())
	p.waitReady(t, addr)
	server := "--server=http://" + addr
	api := func(image string) (int, string) {
		b, _ := json.Marshal(map[string]any{"images": []string{image}})
		resp, err := http.Post("http://"+addr+"/v2/_slipway/prefetch", "application/json", bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	for _, image := range []string{
		"team/single:v1",
		"team/single:v1@" + d.String(),
		"team/single@" + d.String(),
		up.host + "/team/single:v1", // the upstream by host:port: ?ns=
		up.host + "/team/single:v1@" + d.String(),
	} {
		code, out, errOut := runOnce(t, nil, "prefetch", server, image)
		if code != 0 || !strings.Contains(out, "prefetched 1 of 1 images") {
			t.Errorf("slipway prefetch %s: exit %d\n%s%s", image, code, out, errOut)
		}
		if status, body := api(image); status != http.StatusOK {
			t.Errorf("POST prefetch %s: %d %s", image, status, body)
		}
	}
	gets := up.blobGETs("team/single")
	for image, code := range map[string]string{
		"Team/single:v1":                         "NAME_INVALID",
		"team//single:v1":                        "NAME_INVALID",
		"team/single:.v1":                        "TAG_INVALID",
		"team/single@sha256:abc":                 "DIGEST_INVALID",
		"team/single@md5:" + d.Hex[:32]:          "DIGEST_INVALID",
		"https://" + up.host + "/team/single:v1": "NAME_INVALID",
	} {
		c, out, errOut := runOnce(t, nil, "prefetch", server, "team/single:v1", image)
		if c != 2 || !strings.Contains(errOut, code) || !strings.Contains(errOut, image) || out != "" {
			t.Errorf("slipway prefetch %s: exit %d, want 2 with %s naming it\n%s%s", image, c, code, out, errOut)
		}
		status, body := api(image)
		if status != http.StatusBadRequest || !strings.Contains(body, `"code":"`+code+`"`) {
			t.Errorf("POST prefetch %s: %d %s, want 400 %s", image, status, body, code)
		}
	}
	if n := up.blobGETs("team/single"); n != gets {
		t.Errorf("bad names made %d upstream blob GETs", n-gets)
	}
	p.stop(t, syscall.SIGTERM, 10*time.Second)
}
