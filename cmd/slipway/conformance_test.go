package main

// The OCI distribution-spec conformance suite against the slipway binary:
// once as a push target (push, pull, content discovery, content management),
// once read-only through the mirror in front of a seeded upstream. The suite
// is a `package main` that .ci/conformance requires as a tool; this test
// builds it, runs it, and reads the results it writes, since a
// configuration mistake can make it exit 0 having run nothing.

import (
	"bufio"
	"context"
	"encoding/xml"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

const conformanceModule = "github.com/opencontainers/distribution-spec/conformance"

func TestConformance(t *testing.T) {
	if testing.Short() {
		t.Skip("the conformance suite is not short")
	}
	suite := buildConformance(t)

	t.Run("push target", func(t *testing.T) {
		addr := freeAddr(t)
		// The push prefix makes conformance/* local even before anything is
		// pushed (the suite starts by listing an empty repository); the
		// upstream is never contacted.
		p := start(t, nil, "serve", "--listen", addr, "--data-dir", t.TempDir(),
			"--upstream", "http://127.0.0.1:1", "--push-prefix", "conformance", "--log-level", "warn")
		p.waitReady(t, addr)
		c := runConformance(t, suite, []string{
			"OCI_REGISTRY=" + addr,
			"OCI_REPO1=conformance/repo1",
			"OCI_REPO2=conformance/repo2",
		})
		c.check(t, "push target", true)
	})

	// Through the mirror, read-only, with tag lists and referrers: once in
	// front of an upstream with the referrers API, once in front of one
	// without (slipway then reads the referrers tag schema).
	for _, referrersAPI := range []bool{true, false} {
		t.Run(fmt.Sprintf("pull through, upstream referrers API %v", referrersAPI), func(t *testing.T) {
			pullThroughConformance(t, suite, referrersAPI)
		})
	}
}

func pullThroughConformance(t *testing.T, suite string, referrersAPI bool) {
	up := newUpstream(t, registry.WithReferrersSupport(referrersAPI))
	img, err := random.Image(64<<10, 2)
	if err != nil {
		t.Fatal(err)
	}
	img = mutate.MediaType(img, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	if err := crane.Push(img, up.host+"/seeded/app:v1", crane.Insecure); err != nil {
		t.Fatal(err)
	}
	for _, tag := range []string{"v2", "v3", "latest"} {
		if err := crane.Push(img, up.host+"/seeded/app:"+tag, crane.Insecure); err != nil {
			t.Fatal(err)
		}
	}
	d, _ := img.Digest()
	m, _ := img.Manifest()
	blobs := []string{m.Config.Digest.String()}
	for _, l := range m.Layers {
		blobs = append(blobs, l.Digest.String())
	}
	pushReferrer(t, up, "seeded/app", img, !referrersAPI)
	addr := freeAddr(t)
	p := start(t, nil, "serve", "--listen", addr, "--data-dir", t.TempDir(),
		"--upstream", up.url, "--push=false", "--log-level", "warn")
	p.waitReady(t, addr)
	env := []string{
		"OCI_REGISTRY=" + addr,
		"OCI_REPO1=seeded/app",
		"OCI_REPO2=seeded/other",
		"OCI_API_PUSH=false",
		"OCI_API_BLOBS_DELETE=false",
		"OCI_API_MANIFESTS_DELETE=false",
		"OCI_API_TAGS_DELETE=false",
		// This suite version never captures the response of a
		// manifest GET or HEAD for read-only data (it has no bytes to
		// compare), so with the header required it fails every
		// registry. Blob digest headers stay required.
		"OCI_API_MANIFESTS_DIGEST_HEADER=false",
	}
	roData := []string{
		"OCI_RO_DATA_TAGS=v1 v2 v3 latest",
		"OCI_RO_DATA_MANIFESTS=" + d.String(),
		"OCI_RO_DATA_BLOBS=" + strings.Join(blobs, " "),
		"OCI_RO_DATA_REFERRERS=" + d.String(),
	}
	// With OCI_API_PUSH=false, this suite version panics writing its
	// results (it records a status for the blob API tests it skipped
	// without their data set), and a data set a filter left untested
	// has a status it cannot write. So each branch that can run
	// read-only runs on its own, through OCI_FILTER_TEST, and only the
	// read-only branch gets the seeded data.
	var total junitCounts
	for _, branch := range []string{"ping", "empty", "missing-manifest", "invalid-digest-format", "read-only"} {
		benv := append(slices.Clone(env), "OCI_FILTER_TEST=OCI Conformance Test/"+branch)
		if branch == "read-only" {
			benv = append(benv, roData...)
		}
		c := runConformance(t, suite, benv)
		c.check(t, "pull through, "+branch, false)
		total.add(c.counts)
	}
	t.Logf("conformance (pull through, all branches): %d checks: %d pass, %d fail, %d error, %d skip, %d disabled",
		total.Tests, total.passed(), total.Failures, total.Errors, total.Skipped, total.Disabled)
}

// pushReferrer puts an SBOM-like artifact that refers to subject into
// repo at the upstream. tagSchema: also the referrers tag (sha256-<hex>)
// an upstream without the referrers API needs, as clients write it.
func pushReferrer(t *testing.T, up *fakeUpstream, repo string, subject v1.Image, tagSchema bool) v1.Image {
	t.Helper()
	sd, err := partial.Descriptor(subject)
	if err != nil {
		t.Fatal(err)
	}
	art, err := random.Image(1<<10, 1)
	if err != nil {
		t.Fatal(err)
	}
	art = mutate.MediaType(art, types.OCIManifestSchema1)
	art = mutate.ConfigMediaType(art, "application/vnd.example.sbom")
	art = mutate.Subject(art, *sd).(v1.Image)
	ad, err := art.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if err := crane.Push(art, up.host+"/"+repo+"@"+ad.String(), crane.Insecure); err != nil {
		t.Fatal(err)
	}
	if tagSchema {
		desc, err := partial.Descriptor(art)
		if err != nil {
			t.Fatal(err)
		}
		desc.ArtifactType = "application/vnd.example.sbom"
		idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex), mutate.IndexAddendum{Add: art, Descriptor: *desc})
		ref, err := name.ParseReference(up.host+"/"+repo+":"+strings.Replace(sd.Digest.String(), ":", "-", 1), name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		if err := remote.WriteIndex(ref, idx); err != nil {
			t.Fatal(err)
		}
	}
	return art
}

// buildConformance builds the suite from the module .ci/conformance pins.
func buildConformance(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "conformance")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, conformanceModule)
	cmd.Dir = filepath.Join("..", "..", ".ci", "conformance")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building the conformance suite (%s in .ci/conformance): %v\n%s", conformanceModule, err, out)
	}
	return bin
}

type conformanceRun struct {
	dir    string
	output string
	exit   error
	counts junitCounts
}

// junitCounts are the totals junit.xml carries.
type junitCounts struct {
	Tests    int `xml:"tests,attr"`
	Failures int `xml:"failures,attr"`
	Errors   int `xml:"errors,attr"`
	Skipped  int `xml:"skipped,attr"`
	Disabled int `xml:"disabled,attr"`
}

func (c *junitCounts) add(o junitCounts) {
	c.Tests += o.Tests
	c.Failures += o.Failures
	c.Errors += o.Errors
	c.Skipped += o.Skipped
	c.Disabled += o.Disabled
}

func (c junitCounts) passed() int { return c.Tests - c.Failures - c.Errors - c.Skipped - c.Disabled }

// runConformance runs the suite with env (plus TLS off, the dev profile,
// which tests everything this suite version knows, and a results directory)
// in an empty directory, so no oci-conformance.yaml is picked up.
func runConformance(t *testing.T, suite string, env []string) conformanceRun {
	t.Helper()
	r := conformanceRun{dir: t.TempDir()}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, suite)
	cmd.Dir = r.dir
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OCI_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, "OCI_TLS=disabled", "OCI_VERSION=dev", "OCI_LOG=warn",
		"OCI_RESULTS_DIR="+filepath.Join(r.dir, "results"))
	cmd.Env = append(cmd.Env, env...)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	r.output, r.exit = string(out), err
	b, rerr := os.ReadFile(filepath.Join(r.dir, "results", "junit.xml"))
	if rerr != nil {
		t.Fatalf("the suite wrote no junit.xml (%v, exit %v):\n%s", rerr, err, out)
	}
	var suites struct {
		junitCounts
	}
	if err := xml.Unmarshal(b, &suites); err != nil {
		t.Fatalf("junit.xml: %v", err)
	}
	r.counts = suites.junitCounts
	t.Logf("conformance suite ran in %s", time.Since(start).Round(time.Millisecond))
	return r
}

// check fails the test on any failure, error, or (for a push target) skip,
// and when nothing ran; it logs the counts either way.
func (r conformanceRun) check(t *testing.T, what string, noSkips bool) {
	t.Helper()
	c := r.counts
	t.Logf("conformance (%s): %d checks: %d pass, %d fail, %d error, %d skip, %d disabled",
		what, c.Tests, c.passed(), c.Failures, c.Errors, c.Skipped, c.Disabled)
	bad := c.Failures > 0 || c.Errors > 0 || c.passed() <= 0 || (noSkips && c.Skipped > 0)
	if r.exit != nil || !strings.Contains(r.output, "OCI Conformance Result: Pass") {
		bad = true
	}
	// results.yaml: no API or data set may be anything but passed (or
	// disabled by the configuration above).
	if f, err := os.Open(filepath.Join(r.dir, "results", "results.yaml")); err != nil {
		t.Errorf("results.yaml: %v", err)
	} else {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			if strings.HasSuffix(line, ": FAIL") || strings.HasSuffix(line, ": Error") || (noSkips && strings.HasSuffix(line, ": Skip")) {
				t.Errorf("results.yaml: %s", line)
				bad = true
			}
		}
		f.Close()
	}
	if bad {
		t.Errorf("conformance (%s) did not pass 100%% (exit %v):\n%s", what, r.exit, failures(r.output))
	}
}

// failures is the suite's report less its passing lines.
func failures(out string) string {
	var b strings.Builder
	for _, l := range strings.Split(out, "\n") {
		if !strings.HasSuffix(l, ": Pass") {
			fmt.Fprintln(&b, l)
		}
	}
	return b.String()
}
