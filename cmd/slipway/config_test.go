package main

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
)

func writeConfig(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "slipway.yaml")
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

const sampleConfig = `
listen: ":6000"
data_dir: /from/file
tag_ttl: 7m
push_prefix: [ci, team]
default_upstream: ghcr.io
upstreams:
  - name: docker.io
    url: https://registry-1.docker.io
    aliases: [hub]
    username: me
    password_env: SLIPWAY_TEST_HUB_PASSWORD
  - name: ghcr.io
    url: https://ghcr.io/
    token: abc
    tag_ttl: 1m
    stale_on_404: true
    max_concurrent: 4
    negative_ttl: 3s
`

func TestConfigFileAndPrecedence(t *testing.T) {
	t.Setenv("SLIPWAY_TEST_HUB_PASSWORD", "hunter2")
	p := writeConfig(t, sampleConfig)
	t.Setenv("SLIPWAY_DATA_DIR", "/from/env")
	c, err := parseServe([]string{"--config", p, "--tag-ttl", "9m"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.listen != ":6000" {
		t.Errorf("listen %q: the file's value should hold", c.listen)
	}
	if c.dataDir != "/from/env" {
		t.Errorf("data dir %q: env beats file", c.dataDir)
	}
	if c.tagTTL != 9*time.Minute {
		t.Errorf("tag ttl %s: flag beats file", c.tagTTL)
	}
	if c.pushPrefix != "ci,team" {
		t.Errorf("push prefix %q from a YAML list", c.pushPrefix)
	}
	specs, def, err := upstreamSpecs(c)
	if err != nil {
		t.Fatal(err)
	}
	if len(specs) != 2 || specs[def].name != "ghcr.io" {
		t.Fatalf("specs %+v default %d", specs, def)
	}
	hub, gh := specs[0], specs[1]
	if b, ok := hub.auth.(*authn.Basic); !ok || b.Username != "me" || b.Password != "hunter2" {
		t.Errorf("docker.io auth %#v", hub.auth)
	}
	if hub.tagTTL != 9*time.Minute || gh.tagTTL != time.Minute {
		t.Errorf("tag ttls %s %s", hub.tagTTL, gh.tagTTL)
	}
	if !gh.staleOn404 || gh.maxConc != 4 || gh.negativeTTL != 3*time.Second || gh.url != "https://ghcr.io" {
		t.Errorf("ghcr.io spec %+v", gh)
	}
	if cfg, _ := gh.auth.Authorization(); cfg == nil || cfg.RegistryToken != "abc" {
		t.Errorf("ghcr.io token auth %#v", gh.auth)
	}

	// --upstream names the default by URL, or adds one.
	t.Setenv("SLIPWAY_UPSTREAM", "https://registry-1.docker.io")
	c, _ = parseServe([]string{"--config", p}, io.Discard)
	specs, def, _ = upstreamSpecs(c)
	if len(specs) != 2 || specs[def].name != "docker.io" {
		t.Errorf("SLIPWAY_UPSTREAM should pick docker.io: %d specs, default %q", len(specs), specs[def].name)
	}
	c, _ = parseServe([]string{"--config", p, "--upstream", "http://127.0.0.1:5001"}, io.Discard)
	specs, def, _ = upstreamSpecs(c)
	if len(specs) != 3 || specs[def].url != "http://127.0.0.1:5001" {
		t.Errorf("--upstream not in the file should be added as the default: %+v", specs)
	}
}

func TestNoConfigIsDockerHub(t *testing.T) {
	c, err := parseServe(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	specs, def, err := upstreamSpecs(c)
	if err != nil || len(specs) != 1 || specs[def].url != "https://registry-1.docker.io" || specs[def].auth != nil {
		t.Fatalf("%v %+v", err, specs)
	}
}

func TestConfigFileErrors(t *testing.T) {
	for _, tc := range []struct{ name, text, want string }{
		{"unknown key", "lisen: :5000\n", `unknown key "lisen"`},
		{"unknown upstream key", "upstreams:\n  - name: a\n    url: https://a.example\n    pasword: x\n", "pasword"},
		{"bad duration", "tag_ttl: soon\n", "tag_ttl"},
		{"missing url", "upstreams:\n  - name: a\n", "name and url are required"},
		{"twice", "upstreams:\n  - {name: a, url: https://a.example}\n  - {name: a, url: https://b.example}\n", "twice"},
		{"default not listed", "default_upstream: b\nupstreams:\n  - {name: a, url: https://a.example}\n", "not in upstreams"},
		{"not yaml", "upstreams: [\n", "config"},
		{"config in config", "config: other.yaml\n", "unknown key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseServe([]string{"--config", writeConfig(t, tc.text)}, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err %v, want it to mention %q", err, tc.want)
			}
		})
	}
	for _, tc := range []struct{ name, text, want string }{
		{"credentials in url", "upstreams:\n  - {name: a, url: 'https://u:secret@a.example'}\n", "not in the url"},
		{"empty password env", "upstreams:\n  - {name: a, url: https://a.example, password_env: SLIPWAY_TEST_UNSET}\n", "is empty"},
		{"bad scheme", "upstreams:\n  - {name: a, url: 'ftp://a.example'}\n", "invalid URL"},
		{"bad policy rule", "upstreams:\n  - {name: a, url: https://a.example, policy: {deny: ['repo:']}}\n", "policy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := parseServe([]string{"--config", writeConfig(t, tc.text)}, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			_, _, err = upstreamSpecs(c)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err %v, want it to mention %q", err, tc.want)
			}
			if err != nil && strings.Contains(err.Error(), "secret") {
				t.Errorf("the error shows a password: %v", err)
			}
		})
	}
	if _, err := parseServe([]string{"--config", "/nonexistent/slipway.yaml"}, io.Discard); err == nil {
		t.Error("a missing config file was accepted")
	}
}

// A policy in the config file reaches its upstream, Docker Hub names
// normalized.
func TestConfigPolicy(t *testing.T) {
	c, err := parseServe([]string{"--config", writeConfig(t, `upstreams:
  - name: docker.io
    url: https://registry-1.docker.io
    policy:
      deny_by_default: true
      allow: [alpine, "golang:1.*", "myorg/**"]
      deny: ["alpine:*-rc*"]
  - name: other
    url: https://other.example
`)}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	specs, _, err := upstreamSpecs(c)
	if err != nil {
		t.Fatal(err)
	}
	p := specs[0].policy
	if p == nil || !p.DenyByDefault || len(p.Allow) != 3 || len(p.Deny) != 1 {
		t.Fatalf("policy = %+v", p)
	}
	for _, tc := range []struct {
		repo, tag string
		want      bool
	}{{"library/alpine", "3.20", true}, {"library/alpine", "3.21-rc1", false}, {"library/golang", "1.22", true},
		{"library/golang", "latest", false}, {"myorg/a/b", "x", true}, {"library/nginx", "1", false}} {
		if got := p.Allows(tc.repo, tc.tag); got != tc.want {
			t.Errorf("Allows(%s:%s) = %v", tc.repo, tc.tag, got)
		}
	}
	if specs[1].policy != nil {
		t.Errorf("an upstream without a policy has %+v", specs[1].policy)
	}
}
