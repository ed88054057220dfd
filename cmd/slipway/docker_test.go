package main

// A real Docker daemon against slipway (issue 15): Debian's docker.io
// (dockerd 20.10 and its client at /usr/bin/docker) pulls Docker Hub names
// through the mirror, builds with BuildKit FROM one of them, and pushes
// into slipway, and every digest it reports is checked against slipway and
// the upstream.
//
// dockerd runs in namespaces of its own, so it can neither reach the real
// Docker Hub nor disturb the host: the test re-runs its own binary under
// `unshare --net --mount --pid --mount-proc --fork --kill-child` (the test
// then is pid 1 there, and every process it leaves dies with it), brings lo
// up, mounts a tmpfs on /run, and starts the upstream registry (in
// process), slipway and dockerd inside. The only network is that
// namespace's loopback, so whatever the daemon pulls came through slipway.

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
)

const (
	// dockerInsideEnv marks the re-run test binary that runs inside the
	// namespaces; it holds the work directory the outer test made.
	dockerInsideEnv = "SLIPWAY_TEST_DOCKER_INSIDE"
	// testBinEnv hands the inner test binary the slipway binary TestMain
	// built in the outer one, so it is not built twice.
	testBinEnv = "SLIPWAY_TEST_BIN"
	// dockerClient is the 20.10 client of Debian's docker.io package;
	// /usr/local/bin/docker, first on PATH, may be another one.
	dockerClient = "/usr/bin/docker"
)

func TestDockerDaemonPullsBuildsAndPushesThroughSlipway(t *testing.T) {
	if dir := os.Getenv(dockerInsideEnv); dir != "" {
		dockerInside(t, dir)
		return
	}
	t.Parallel()
	unshare := dockerPrerequisites(t)

	// A short path: dockerd and containerd put unix sockets under it.
	dir, err := os.MkdirTemp("", "slipway-docker-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })

	limit := 4 * time.Minute
	if dl, ok := t.Deadline(); ok && time.Until(dl)-30*time.Second < limit {
		limit = time.Until(dl) - 30*time.Second
	}
	run := "^" + t.Name() + "$"
	cmd := exec.Command(unshare, "--net", "--mount", "--pid", "--mount-proc", "--fork", "--kill-child", "--",
		os.Args[0], "-test.run="+run, "-test.count=1", "-test.v", "-test.timeout="+limit.String())
	cmd.Env = append(os.Environ(), dockerInsideEnv+"="+dir, testBinEnv+"="+binPath)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(limit + 20*time.Second):
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		err = <-done
		log, _ := os.ReadFile(filepath.Join(dir, "dockerd.log"))
		t.Fatalf("the test inside the namespaces did not end within %s; its output:\n%s\ndockerd's log:\n%s",
			limit+20*time.Second, out.String(), tail(string(log), 80))
	}
	// Its process group, should anything of it outlive unshare.
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	if err != nil || !strings.Contains(out.String(), "--- PASS: "+t.Name()) {
		t.Fatalf("the test inside the namespaces failed (%v); its output:\n%s", err, out.String())
	}
	t.Logf("passed inside the namespaces in %s:\n%s", time.Since(start).Round(time.Millisecond), tail(out.String(), 40))
}

// dockerPrerequisites returns unshare's path. Without a tool it needs, or
// without root, it skips the test, except in CI, where it fails it.
func dockerPrerequisites(t *testing.T) string {
	t.Helper()
	var missing []string
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		missing = append(missing, "unshare (util-linux)")
	}
	if _, err := lookPath("ip", "/usr/sbin/ip", "/sbin/ip"); err != nil {
		missing = append(missing, "ip (iproute2)")
	}
	if _, err := lookPath("dockerd", "/usr/sbin/dockerd", "/usr/bin/dockerd"); err != nil {
		missing = append(missing, "dockerd (docker.io)")
	}
	if _, err := os.Stat(dockerClient); err != nil {
		missing = append(missing, dockerClient+" (docker.io)")
	}
	var why []string
	if len(missing) > 0 {
		why = append(why, "it needs "+strings.Join(missing, ", ")+" (.ci/run installs them: apt-get install docker.io iproute2 util-linux)")
	}
	if os.Geteuid() != 0 {
		why = append(why, "it must run as root (namespaces, dockerd)")
	}
	if len(why) > 0 {
		if os.Getenv("CI") == "" {
			t.Skipf("no real Docker daemon here: %s", strings.Join(why, "; "))
		}
		t.Fatalf("CI must run the real Docker daemon test, but %s", strings.Join(why, "; "))
	}
	return unshare
}

// lookPath finds file on PATH or at one of the usual places (sbin is not on
// every PATH).
func lookPath(file string, places ...string) (string, error) {
	if p, err := exec.LookPath(file); err == nil {
		return p, nil
	}
	for _, p := range places {
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found", file)
}

// dockerInside is the test proper, run inside the namespaces.
func dockerInside(t *testing.T, dir string) {
	began := time.Now()
	step := func(what string, since time.Time) {
		t.Helper()
		t.Logf("%-52s %6.1fs", what, time.Since(since).Seconds())
	}
	enterNamespaces(t)

	up := newDockerUpstream(t)
	hub := seedDockerHub(t, up)

	// slipway: the Docker Hub upstream (named docker.io, so the daemon's
	// unprefixed names and BuildKit's ?ns=docker.io both reach it) is the
	// registry above; ci/ is for pushes.
	addr := freeAddr(t)
	conf := filepath.Join(dir, "slipway.yaml")
	writeFile(t, conf, fmt.Sprintf("push_prefix: [ci]\ndefault_upstream: docker.io\nupstreams:\n"+
		"  - name: docker.io\n    url: %s\n    aliases: [hub]\n", up.url))
	sw := start(t, nil, "serve", "--listen", addr, "--data-dir", filepath.Join(dir, "slipway-data"),
		"--config", conf, "--log-format", "json")
	sw.waitReady(t, addr)

	d := startDockerd(t, dir, addr)
	step("namespaces, upstream, slipway and dockerd ready", began)

	// 1. Pulls of Docker Hub names through the mirror: the image the
	// daemon stored is the upstream's, byte for byte.
	t0 := time.Now()
	for _, c := range []struct {
		ref, repoDigestName string
		img                 hubImage
	}{
		{"alpine:3.20", "alpine", hub.alpine},
		{"library/busybox:latest", "busybox", hub.busybox},
	} {
		out := d.run(t, nil, "pull", c.ref)
		if !strings.Contains(out, "Digest: "+c.img.digest.String()) {
			t.Errorf("docker pull %s says\n%s\nwant Digest: %s (the upstream's)", c.ref, out, c.img.digest)
		}
		got := d.inspect(t, c.ref)
		if got.ID != c.img.config.String() {
			t.Errorf("docker pull %s: image id %s, want the upstream's config %s", c.ref, got.ID, c.img.config)
		}
		if want := c.repoDigestName + "@" + c.img.digest.String(); !slices.Contains(got.RepoDigests, want) {
			t.Errorf("docker pull %s: RepoDigests %v, want %s", c.ref, got.RepoDigests, want)
		}
		if !slices.Equal(got.RootFS.Layers, hashStrings(c.img.diffIDs)) {
			t.Errorf("docker pull %s: layers %v, want the upstream's %v", c.ref, got.RootFS.Layers, c.img.diffIDs)
		}
	}
	step("docker pull alpine:3.20, library/busybox:latest", t0)

	// 2. A BuildKit build whose FROM comes through the mirror: alpine is
	// removed first, and nothing but slipway is reachable. Its RUN step
	// runs the base image's shell under runc.
	t0 = time.Now()
	d.run(t, nil, "image", "rm", "alpine:3.20")
	if _, err := d.try(nil, "image", "inspect", "alpine:3.20"); err == nil {
		t.Fatal("alpine:3.20 is still in the daemon after docker image rm")
	}
	alpineAsked := sw.countRequests("/v2/library/alpine/manifests/")
	app := addr + "/ci/app:1"
	iid := d.build(t, app, map[string]string{
		"Dockerfile": "FROM alpine:3.20\nRUN echo built by BuildKit > /built.txt\nCOPY app.txt /app.txt\n",
		"app.txt":    "app 1\n",
	})
	if sw.countRequests("/v2/library/alpine/manifests/") == alpineAsked {
		t.Error("the build's FROM alpine:3.20 asked slipway for no manifest of library/alpine")
	}
	step("BuildKit build FROM alpine:3.20 with RUN and COPY", t0)

	t0 = time.Now()
	pushed := d.push(t, app)
	checkPushed(t, d, addr, "ci/app", "1", pushed, iid)
	m := slipwayManifest(t, addr, "ci/app", pushed.digest)
	if len(m.Layers) != 4 {
		t.Fatalf("ci/app:1 has %d layers, want 4 (alpine's two, RUN, COPY)", len(m.Layers))
	}
	if got := fileInLayer(t, addr, "ci/app", m.Layers[2].Digest, "built.txt"); got != "built by BuildKit\n" {
		t.Errorf("the RUN layer's /built.txt holds %q, want %q", got, "built by BuildKit\n")
	}
	if got := fileInLayer(t, addr, "ci/app", m.Layers[3].Digest, "app.txt"); got != "app 1\n" {
		t.Errorf("the COPY layer's /app.txt holds %q, want %q", got, "app 1\n")
	}
	step("docker push ci/app:1, checked", t0)

	// 3. Four images that share busybox's layers and one more, pushed at
	// once into four repositories: the pushes check for, upload and
	// cross-mount the shared blobs at the same time (dockerd joins two
	// uploads of one layer into one, so not every push uploads each).
	t0 = time.Now()
	const n = 4
	refs, iids := make([]string, n), make([]string, n)
	for i := range n {
		refs[i] = fmt.Sprintf("%s/ci/multi-%d:v1", addr, i)
		iids[i] = d.build(t, refs[i], map[string]string{
			"Dockerfile": "FROM library/busybox:latest\nCOPY shared.txt /shared.txt\nCOPY own.txt /own.txt\n",
			"shared.txt": "in all four\n",
			"own.txt":    fmt.Sprintf("image %d\n", i),
		})
	}
	step("4 BuildKit builds FROM library/busybox:latest", t0)
	t0 = time.Now()
	results := make([]pushResult, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { results[i] = d.pushResult(refs[i]) })
	}
	wg.Wait()
	for i, r := range results {
		if r.err != nil {
			t.Fatalf("concurrent docker push %s: %v", refs[i], r.err)
		}
	}
	var shared []digest.Digest
	for i, r := range results {
		repo := fmt.Sprintf("ci/multi-%d", i)
		checkPushed(t, d, addr, repo, "v1", r, iids[i])
		m := slipwayManifest(t, addr, repo, r.digest)
		if len(m.Layers) != len(hub.busybox.layers)+2 {
			t.Fatalf("%s has %d layers, want busybox's %d and two COPY layers", repo, len(m.Layers), len(hub.busybox.layers))
		}
		var these []digest.Digest
		for _, l := range m.Layers[:len(m.Layers)-1] {
			these = append(these, digest.Digest(l.Digest.String()))
		}
		if i == 0 {
			shared = these
		} else if !slices.Equal(these, shared) {
			t.Errorf("%s's shared layers are %v, %s's %v: the four do not share them", repo, these, "ci/multi-0", shared)
		}
	}
	step("4 concurrent docker pushes, checked", t0)

	// 4. The upstream: each blob the daemon needed was fetched once,
	// however often the daemon and BuildKit asked slipway; the platform
	// nobody pulled was never fetched; pushed names never reached it.
	for _, img := range []hubImage{hub.alpine, hub.busybox} {
		for _, b := range append([]digest.Digest{img.config}, img.layers...) {
			if got := up.gets(b); got != 1 {
				t.Errorf("upstream GETs of %s blob %s: %d, want exactly 1", img.name, b, got)
			}
		}
	}
	for _, b := range hub.otherPlatform {
		if got := up.gets(b); got != 0 {
			t.Errorf("upstream GETs of %s, a blob of the platform nobody pulled: %d, want 0", b, got)
		}
	}
	if paths := up.pathsWith("/ci/"); len(paths) > 0 {
		t.Errorf("pushed repositories reached the upstream: %v", paths)
	}
	if bad := sw.serverErrors(); len(bad) > 0 {
		t.Errorf("slipway answered with 5xx:\n%s", strings.Join(bad, "\n"))
	}
	if bad := sw.warnings(); len(bad) > 0 {
		t.Errorf("slipway logged warnings or errors:\n%s", strings.Join(bad, "\n"))
	}
	// Docker retries failed transfers and tries the next endpoint when the
	// mirror fails, and a retry that works hides the failure from the
	// commands' exit codes: its log must show none.
	if bad := d.troubles(t); len(bad) > 0 {
		t.Errorf("dockerd logged retries or errors:\n%s", strings.Join(bad, "\n"))
	}

	// slipway shuts down cleanly; with -race, a data race would make
	// this exit 66.
	t0 = time.Now()
	d.stop(t)
	sw.stop(t, syscall.SIGTERM, 15*time.Second)
	step("dockerd and slipway stopped", t0)
	step("in all", began)
}

// enterNamespaces finishes the namespaces unshare made: lo up and a tmpfs
// on /run (containerd's shim sockets live under /run/containerd, and
// dockerd would use a containerd it found at /run/containerd/containerd.sock).
func enterNamespaces(t *testing.T) {
	t.Helper()
	if os.Getpid() != 1 {
		t.Fatalf("inside: pid %d, want 1 (unshare --pid --fork)", os.Getpid())
	}
	ifaces, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range ifaces {
		if i.Name != "lo" {
			t.Fatalf("inside: network interface %s: this is not a new network namespace", i.Name)
		}
	}
	ip, err := lookPath("ip", "/usr/sbin/ip", "/sbin/ip")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(ip, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("ip link set lo up: %v\n%s", err, out)
	}
	if err := syscall.Mount("tmpfs", "/run", "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV, "mode=755"); err != nil {
		t.Fatalf("mount a tmpfs on /run: %v", err)
	}
	// The last cleanup: whatever the others left running.
	t.Cleanup(func() { killLeftovers(t) })
}

// dockerUpstream is a counting registry that also notes every path it
// was asked for.
type dockerUpstream struct {
	*countingRegistry
	url string

	mu    sync.Mutex
	paths []string
}

func newDockerUpstream(t *testing.T) *dockerUpstream {
	t.Helper()
	u := &dockerUpstream{countingRegistry: &countingRegistry{
		reg:      registry.New(registry.Logger(log.New(io.Discard, "", 0))),
		blobGETs: map[string]int{}, sent: map[string]time.Time{},
	}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		u.paths = append(u.paths, r.Method+" "+r.URL.Path)
		u.mu.Unlock()
		u.countingRegistry.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	u.srv, u.url = srv, srv.URL
	u.host = strings.TrimPrefix(srv.URL, "http://")
	return u
}

func (u *dockerUpstream) pathsWith(s string) []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	var out []string
	for _, p := range u.paths {
		if strings.Contains(p, s) {
			out = append(out, p)
		}
	}
	return out
}

// hubImage is an image the upstream holds under a Docker Hub name.
type hubImage struct {
	name    string
	digest  digest.Digest // what a pull by tag resolves to (for alpine, the index)
	config  digest.Digest // the image id docker shows
	layers  []digest.Digest
	diffIDs []digest.Digest
}

type dockerHub struct {
	alpine, busybox hubImage
	otherPlatform   []digest.Digest // blobs of alpine's other platform
}

// seedDockerHub puts two small images at the upstream under Docker Hub
// names, shaped like the real ones:
//   - library/alpine:3.20, a manifest list (as on Docker Hub) of this
//     machine's platform and one other. This platform's image has a
//     working /bin/sh (the host's, with the libraries it loads), so a
//     build can RUN it;
//   - library/busybox:latest, a plain schema 2 manifest of two random
//     layers.
func seedDockerHub(t *testing.T, up *dockerUpstream) dockerHub {
	t.Helper()
	native, err := mutate.AppendLayers(empty.Image, shellLayer(t), fileLayer(t, map[string]string{
		"etc/slipway-release": "a test image, not Alpine\n",
	}))
	if err != nil {
		t.Fatal(err)
	}
	native = withPlatform(t, native, runtime.GOARCH, v1.Config{Env: []string{"PATH=/bin"}, Cmd: []string{"/bin/sh"}})
	otherArch := "s390x"
	if runtime.GOARCH == otherArch {
		otherArch = "arm64"
	}
	other, err := random.Image(64<<10, 2)
	if err != nil {
		t.Fatal(err)
	}
	other = withPlatform(t, other, otherArch, v1.Config{})
	idx := mutate.IndexMediaType(mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: native, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: runtime.GOARCH}}},
		mutate.IndexAddendum{Add: other, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: otherArch}}},
	), types.DockerManifestList)
	ref, err := name.ParseReference(up.host+"/library/alpine:3.20", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteIndex(ref, idx); err != nil {
		t.Fatalf("seed library/alpine:3.20: %v", err)
	}
	busybox, err := random.Image(256<<10, 2)
	if err != nil {
		t.Fatal(err)
	}
	busybox = withPlatform(t, busybox, runtime.GOARCH, v1.Config{Cmd: []string{"sh"}})
	ref, err = name.ParseReference(up.host+"/library/busybox:latest", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, busybox); err != nil {
		t.Fatalf("seed library/busybox:latest: %v", err)
	}

	var hub dockerHub
	hub.alpine = describe(t, "library/alpine:3.20", native)
	d, err := idx.Digest()
	if err != nil {
		t.Fatal(err)
	}
	hub.alpine.digest = digest.Digest(d.String())
	hub.busybox = describe(t, "library/busybox:latest", busybox)
	o := describe(t, "other platform", other)
	hub.otherPlatform = append([]digest.Digest{o.config}, o.layers...)
	return hub
}

func withPlatform(t *testing.T, img v1.Image, arch string, c v1.Config) v1.Image {
	t.Helper()
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Config = "linux", arch, c
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func describe(t *testing.T, ref string, img v1.Image) hubImage {
	t.Helper()
	h := hubImage{name: ref}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	h.digest = digest.Digest(d.String())
	c, err := img.ConfigName()
	if err != nil {
		t.Fatal(err)
	}
	h.config = digest.Digest(c.String())
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		ld, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		diff, err := l.DiffID()
		if err != nil {
			t.Fatal(err)
		}
		h.layers = append(h.layers, digest.Digest(ld.String()))
		h.diffIDs = append(h.diffIDs, digest.Digest(diff.String()))
	}
	return h
}

// shellLayer is a layer with this machine's /bin/sh and the shared
// libraries ldd says it loads, each at its own path, so that it runs in a
// container made of nothing else.
func shellLayer(t *testing.T) v1.Layer {
	t.Helper()
	files := map[string]string{"bin/sh": "/bin/sh"}
	out, err := exec.Command("ldd", "/bin/sh").Output()
	if err != nil && len(out) == 0 {
		t.Logf("ldd /bin/sh: %v (taken as statically linked)", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		var p string
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			p = f[2]
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			p = f[0] // the loader
		default:
			continue
		}
		files[strings.TrimPrefix(p, "/")] = p
	}
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	mtime := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	dirs := map[string]bool{"tmp": true}
	for p := range files {
		for d := path.Dir(p); d != "."; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	for _, d := range slices.Sorted(maps.Keys(dirs)) {
		mode := int64(0o755)
		if d == "tmp" {
			mode = 0o1777
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: mode, ModTime: mtime}); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range slices.Sorted(maps.Keys(files)) {
		body, err := os.ReadFile(files[p]) // through symlinks
		if err != nil {
			t.Fatal(err)
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: p, Mode: 0o755, Size: int64(len(body)), ModTime: mtime}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return tarLayer(t, b.Bytes())
}

// fileLayer is a layer of small regular files.
func fileLayer(t *testing.T, files map[string]string) v1.Layer {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, p := range slices.Sorted(maps.Keys(files)) {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: p, Mode: 0o644, Size: int64(len(files[p])),
			ModTime: time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)}); err != nil {
			t.Fatal(err)
		}
		io.WriteString(tw, files[p])
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return tarLayer(t, b.Bytes())
}

func tarLayer(t *testing.T, tarBytes []byte) v1.Layer {
	t.Helper()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(tarBytes)), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// dockerd is a Docker daemon of this test, and how to run its client.
type dockerd struct {
	dir  string // the client's DOCKER_CONFIG and build contexts live here
	sock string
	cmd  *exec.Cmd
	done chan struct{}
	err  error // Wait's result, set before done is closed
	log  string
}

// startDockerd starts dockerd on its own data root, exec root, pidfile and
// socket under dir, with slipway at addr as its registry mirror, and waits
// (30 s at most) until it answers. At the end of the test it is stopped,
// and every process left in the namespace is killed.
func startDockerd(t *testing.T, dir, addr string) *dockerd {
	t.Helper()
	bin, err := lookPath("dockerd", "/usr/sbin/dockerd", "/usr/bin/dockerd")
	if err != nil {
		t.Fatal(err)
	}
	d := &dockerd{dir: dir, sock: filepath.Join(dir, "docker.sock"), done: make(chan struct{}), log: filepath.Join(dir, "dockerd.log")}
	conf := map[string]any{
		"data-root":           filepath.Join(dir, "data"),
		"exec-root":           filepath.Join(dir, "exec"),
		"pidfile":             filepath.Join(dir, "dockerd.pid"),
		"hosts":               []string{"unix://" + d.sock},
		"storage-driver":      "vfs",
		"bridge":              "none",
		"iptables":            false,
		"ip-forward":          false,
		"registry-mirrors":    []string{"http://" + addr},
		"insecure-registries": []string{addr},
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	confPath := filepath.Join(dir, "daemon.json")
	writeFile(t, confPath, string(b))
	logf, err := os.Create(d.log)
	if err != nil {
		t.Fatal(err)
	}
	d.cmd = exec.Command(bin, "--config-file", confPath)
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logf.Close()
	go func() {
		d.err = d.cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() {
		d.kill(t)
		if t.Failed() {
			b, _ := os.ReadFile(d.log)
			t.Logf("dockerd's log (%s):\n%s", d.log, b)
		}
	})
	if err := os.MkdirAll(filepath.Join(dir, "client"), 0o700); err != nil {
		t.Fatal(err)
	}

	deadline := time.Now().Add(30 * time.Second)
	var last error
	for i := 0; i < 300 && time.Now().Before(deadline); i++ {
		select {
		case <-d.done:
			t.Fatalf("dockerd exited before it answered: %v", d.err)
		default:
		}
		out, err := d.try(nil, "version", "--format", "client {{.Client.Version}}, server {{.Server.Version}}")
		if err == nil {
			t.Logf("docker %s (%s)", strings.TrimSpace(out), dockerClient)
			return d
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("dockerd did not answer within 30 s: %v", last)
	return nil
}

// stop sends dockerd SIGTERM and waits up to 20 s for it (and the
// containerd it runs) to end.
func (d *dockerd) stop(t *testing.T) {
	t.Helper()
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(20 * time.Second):
		t.Errorf("dockerd still running 20 s after SIGTERM")
	}
}

// kill ends dockerd's process group, if it still runs.
func (d *dockerd) kill(t *testing.T) {
	select {
	case <-d.done:
		return
	default:
	}
	syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		t.Errorf("dockerd (pid %d) still running 10 s after SIGKILL", d.cmd.Process.Pid)
	}
}

// killLeftovers kills, by pid, every live process in this pid namespace but
// this one (containerd, or anything else dockerd started outside its
// process group), and says which there were. Zombies are skipped: they are
// gone once this process, their reaper, exits.
func killLeftovers(t *testing.T) {
	for try := 0; try < 50; try++ {
		var live []string
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil || pid == os.Getpid() {
				continue
			}
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
			if err != nil {
				continue
			}
			i := bytes.LastIndexByte(b, ')')
			if i < 0 || i+2 >= len(b) || b[i+2] == 'Z' {
				continue
			}
			live = append(live, fmt.Sprintf("%d %s", pid, b[bytes.IndexByte(b, '(')+1:i]))
			syscall.Kill(pid, syscall.SIGKILL)
		}
		if len(live) == 0 {
			return
		}
		if try == 0 {
			t.Logf("killed processes left in the namespace: %s", strings.Join(live, ", "))
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Errorf("processes still alive in the namespace after SIGKILL")
}

// try runs the docker client (at most 2 minutes) and returns its output;
// the error holds it too.
func (d *dockerd) try(env []string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, dockerClient, args...)
	cmd.Env = append(os.Environ(), "DOCKER_HOST=unix://"+d.sock, "DOCKER_CONFIG="+filepath.Join(d.dir, "client"))
	cmd.Env = append(cmd.Env, env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 5 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("docker %s: no answer within 2 minutes; output:\n%s", strings.Join(args, " "), out.String())
	} else if err != nil {
		err = fmt.Errorf("docker %s: %v; output:\n%s", strings.Join(args, " "), err, out.String())
	}
	return out.String(), err
}

func (d *dockerd) run(t *testing.T, env []string, args ...string) string {
	t.Helper()
	out, err := d.try(env, args...)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out, "Retrying in") {
		t.Errorf("docker %s retried a transfer:\n%s", strings.Join(args, " "), out)
	}
	return out
}

// troubles lists the lines of dockerd's log that say a layer transfer
// failed (and was retried) or that an endpoint (the mirror, or the
// registry pushed to) failed and the next one was tried. Other errors,
// such as dockerd restarting a slow containerd at start, are not
// slipway's.
func (d *dockerd) troubles(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(d.log)
	if err != nil {
		t.Fatal(err)
	}
	var bad []string
	for _, line := range strings.Split(string(b), "\n") {
		// A push to an insecure registry tries HTTPS first, every time.
		if strings.Contains(line, "server gave HTTP response to HTTPS client") {
			continue
		}
		for _, s := range []string{"Download failed", "Upload failed", "Attempting next endpoint", "Not continuing with"} {
			if strings.Contains(line, s) {
				bad = append(bad, line)
				break
			}
		}
	}
	return bad
}

// imageInspect is what this test reads of docker image inspect.
type imageInspect struct {
	ID          string `json:"Id"`
	RepoTags    []string
	RepoDigests []string
	RootFS      struct{ Layers []string }
}

func (d *dockerd) inspect(t *testing.T, ref string) imageInspect {
	t.Helper()
	var got []imageInspect
	if err := json.Unmarshal([]byte(d.run(t, nil, "image", "inspect", ref)), &got); err != nil || len(got) != 1 {
		t.Fatalf("docker image inspect %s: %d images, %v", ref, len(got), err)
	}
	return got[0]
}

// build runs a BuildKit build (DOCKER_BUILDKIT=1) of files, tags it ref
// and returns the image id. RUN steps get --network=none: with "bridge":
// "none" BuildKit's default network fails them ("network bridge not
// found").
func (d *dockerd) build(t *testing.T, ref string, files map[string]string) string {
	t.Helper()
	ctxDir, err := os.MkdirTemp(d.dir, "build-")
	if err != nil {
		t.Fatal(err)
	}
	for p, body := range files {
		writeFile(t, filepath.Join(ctxDir, p), body)
	}
	iidFile := filepath.Join(ctxDir, ".iid")
	d.run(t, []string{"DOCKER_BUILDKIT=1"}, "build", "--progress=plain", "--network=none",
		"--iidfile", iidFile, "-t", ref, ctxDir)
	iid, err := os.ReadFile(iidFile)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(iid))
}

// pushResult is what docker push reported.
type pushResult struct {
	digest digest.Digest
	size   int64
	err    error
}

var pushDigestLine = regexp.MustCompile(`(?m)^\S+: digest: (sha256:[0-9a-f]{64}) size: ([0-9]+)\s*$`)

func (d *dockerd) pushResult(ref string) pushResult {
	out, err := d.try(nil, "push", ref)
	if err != nil {
		return pushResult{err: err}
	}
	if strings.Contains(out, "Retrying in") {
		return pushResult{err: fmt.Errorf("docker push %s retried a transfer:\n%s", ref, out)}
	}
	m := pushDigestLine.FindStringSubmatch(out)
	if m == nil {
		return pushResult{err: fmt.Errorf("docker push %s printed no digest:\n%s", ref, out)}
	}
	size, _ := strconv.ParseInt(m[2], 10, 64)
	return pushResult{digest: digest.Digest(m[1]), size: size}
}

func (d *dockerd) push(t *testing.T, ref string) pushResult {
	t.Helper()
	r := d.pushResult(ref)
	if r.err != nil {
		t.Fatal(r.err)
	}
	return r
}

// checkPushed checks an image docker pushed to slipway at repo:tag: the tag
// and the digest serve the manifest docker reported (digest and size), the
// daemon's RepoDigests name it, its config is the image docker built, and
// every blob it names is served whole and matches its digest.
func checkPushed(t *testing.T, d *dockerd, addr, repo, tag string, pushed pushResult, iid string) {
	t.Helper()
	for _, ref := range []string{tag, pushed.digest.String()} {
		body, dcd := getManifest(t, addr, repo, ref)
		if got := digest.FromBytes(body); got != pushed.digest || dcd != pushed.digest.String() {
			t.Errorf("slipway's %s:%s is %s (Docker-Content-Digest %s), docker pushed %s", repo, ref, got, dcd, pushed.digest)
		}
		if int64(len(body)) != pushed.size {
			t.Errorf("slipway's %s:%s is %d bytes, docker pushed %d", repo, ref, len(body), pushed.size)
		}
	}
	got := d.inspect(t, addr+"/"+repo+":"+tag)
	if want := addr + "/" + repo + "@" + pushed.digest.String(); !slices.Contains(got.RepoDigests, want) {
		t.Errorf("after docker push, RepoDigests %v lack %s", got.RepoDigests, want)
	}
	if got.ID != iid {
		t.Errorf("docker image inspect %s:%s: id %s, the build made %s", repo, tag, got.ID, iid)
	}
	m := slipwayManifest(t, addr, repo, pushed.digest)
	if m.Config.Digest.String() != iid {
		t.Errorf("%s:%s's config is %s, the image docker built is %s", repo, tag, m.Config.Digest, iid)
	}
	for _, b := range append([]v1.Descriptor{m.Config}, m.Layers...) {
		getBlob(t, addr, repo, digest.Digest(b.Digest.String()), b.Size)
	}
	// The config slipway holds lists the layers the daemon has.
	var cf v1.ConfigFile
	if err := json.Unmarshal(getBlob(t, addr, repo, digest.Digest(m.Config.Digest.String()), m.Config.Size), &cf); err != nil {
		t.Fatalf("%s config: %v", repo, err)
	}
	var diffs []string
	for _, h := range cf.RootFS.DiffIDs {
		diffs = append(diffs, h.String())
	}
	if !slices.Equal(diffs, got.RootFS.Layers) {
		t.Errorf("%s:%s's config lists layers %v, the daemon's image %v", repo, tag, diffs, got.RootFS.Layers)
	}
}

// getManifest GETs a manifest from slipway and returns its bytes and
// Docker-Content-Digest.
func getManifest(t *testing.T, addr, repo, ref string) ([]byte, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/v2/"+repo+"/manifests/"+ref, nil)
	req.Header.Set("Accept", strings.Join([]string{string(types.DockerManifestSchema2), string(types.OCIManifestSchema1),
		string(types.DockerManifestList), string(types.OCIImageIndex)}, ", "))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s manifest %s: status %d, %v: %s", repo, ref, resp.StatusCode, err, body)
	}
	return body, resp.Header.Get("Docker-Content-Digest")
}

func slipwayManifest(t *testing.T, addr, repo string, d digest.Digest) *v1.Manifest {
	t.Helper()
	body, _ := getManifest(t, addr, repo, d.String())
	m, err := v1.ParseManifest(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("%s@%s: %v", repo, d, err)
	}
	return m
}

// getBlob GETs a blob from slipway and checks its size and digest.
func getBlob(t *testing.T, addr, repo string, d digest.Digest, size int64) []byte {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/v2/" + repo + "/blobs/" + d.String())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s blob %s: status %d, %v", repo, d, resp.StatusCode, err)
	}
	sum := sha256.Sum256(body)
	if got := "sha256:" + hex.EncodeToString(sum[:]); got != d.String() || int64(len(body)) != size {
		t.Errorf("%s blob %s: %d bytes hashing to %s, want %d bytes", repo, d, len(body), got, size)
	}
	return body
}

// fileInLayer returns the content of file in a gzipped layer from slipway.
func fileInLayer(t *testing.T, addr, repo string, layer v1.Hash, file string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/v2/" + repo + "/blobs/" + layer.String())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	zr, err := gzip.NewReader(resp.Body)
	if err != nil {
		t.Fatalf("layer %s: %v", layer, err)
	}
	tr := tar.NewReader(zr)
	var names []string
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("layer %s: %v", layer, err)
		}
		if strings.TrimPrefix(h.Name, "./") == file {
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			return string(b)
		}
		names = append(names, h.Name)
	}
	t.Errorf("layer %s has no %s, only %v", layer, file, names)
	return ""
}

// slipwayRequest is a request log line of slipway (--log-format json).
type slipwayRequest struct {
	Msg    string `json:"msg"`
	Method string `json:"method"`
	Path   string `json:"path"`
	Status int    `json:"status"`
}

func (p *proc) requests() []slipwayRequest {
	var out []slipwayRequest
	for _, line := range strings.Split(p.stderr.String(), "\n") {
		var r slipwayRequest
		if json.Unmarshal([]byte(line), &r) == nil && r.Path != "" && r.Status != 0 {
			out = append(out, r)
		}
	}
	return out
}

// countRequests counts slipway's requests whose path has prefix.
func (p *proc) countRequests(prefix string) int {
	n := 0
	for _, r := range p.requests() {
		if strings.HasPrefix(r.Path, prefix) {
			n++
		}
	}
	return n
}

// warnings lists slipway's log lines at WARN or ERROR.
func (p *proc) warnings() []string {
	var bad []string
	for _, line := range strings.Split(p.stderr.String(), "\n") {
		var l struct{ Level string }
		if json.Unmarshal([]byte(line), &l) == nil && (l.Level == "WARN" || l.Level == "ERROR") {
			bad = append(bad, line)
		}
	}
	return bad
}

func (p *proc) serverErrors() []string {
	var bad []string
	for _, r := range p.requests() {
		if r.Status >= 500 {
			bad = append(bad, fmt.Sprintf("%d %s %s", r.Status, r.Method, r.Path))
		}
	}
	return bad
}

func hashStrings(ds []digest.Digest) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = d.String()
	}
	return out
}

func writeFile(t *testing.T, p, body string) {
	t.Helper()
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
}
