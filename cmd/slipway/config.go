package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"go.yaml.in/yaml/v3"

	"slipway/upstream"
)

// The config file (--config, SLIPWAY_CONFIG) is YAML. Its top-level keys
// are serve's flags with underscores (data_dir: ..., tag_ttl: 10m), plus
// the list of upstreams. Precedence: flag, then environment twin, then
// file, then default.
//
//	listen: ":5000"
//	data_dir: /var/lib/slipway
//	default_upstream: docker.io
//	upstreams:
//	  - name: docker.io
//	    url: https://registry-1.docker.io
//	    aliases: [hub]
//	    username: me
//	    password_env: HUB_TOKEN
//	  - name: ghcr.io
//	    url: https://ghcr.io
type fileConfig struct {
	Settings        map[string]any   `yaml:",inline"`
	DefaultUpstream string           `yaml:"default_upstream"`
	Upstreams       []upstreamConfig `yaml:"upstreams"`
	// Users limits what htpasswd users may push:
	//	users:
	//	  ci: {push: ["ci", "team/"]}
	//	  reader: {push: []}
	// A user not listed may push to any repository.
	Users map[string]userConfig `yaml:"users"`
}

// userConfig is one entry of the config file's users map.
type userConfig struct {
	Push []string `yaml:"push"`
}

// upstreamConfig is one entry of the config file's upstreams list.
type upstreamConfig struct {
	Name          string        `yaml:"name"`
	URL           string        `yaml:"url"`
	Aliases       []string      `yaml:"aliases"`
	Username      string        `yaml:"username"`
	Password      string        `yaml:"password"`
	PasswordEnv   string        `yaml:"password_env"`
	Token         string        `yaml:"token"`
	TokenEnv      string        `yaml:"token_env"`
	TagTTL        string        `yaml:"tag_ttl"`
	StaleOn404    bool          `yaml:"stale_on_404"`
	MaxConcurrent int           `yaml:"max_concurrent"`
	NegativeTTL   string        `yaml:"negative_ttl"`
	AllowPrivate  bool          `yaml:"allow_private"`
	Policy        *policyConfig `yaml:"policy"`
}

// policyConfig is an upstream's pull-through policy:
//
//	policy:
//	  deny_by_default: true
//	  allow: ["alpine", "library/golang:1.*", "myorg/**"]
//	  deny: ["myorg/secret"]
//
// Each rule is a repository glob, with ":tag-glob" to name tags; a deny
// rule that matches wins, then an allow rule, then deny_by_default.
type policyConfig struct {
	DenyByDefault bool     `yaml:"deny_by_default"`
	Allow         []string `yaml:"allow"`
	Deny          []string `yaml:"deny"`
}

// policy parses the rules (for Docker Hub, "alpine" is "library/alpine").
func (pc *policyConfig) policy(dockerHub bool) (*upstream.Policy, error) {
	if pc == nil {
		return nil, nil
	}
	p := &upstream.Policy{DenyByDefault: pc.DenyByDefault}
	for _, list := range []struct {
		in  []string
		out *[]upstream.Rule
	}{{pc.Allow, &p.Allow}, {pc.Deny, &p.Deny}} {
		for _, s := range list.in {
			r, err := upstream.ParseRule(s, dockerHub)
			if err != nil {
				return nil, err
			}
			*list.out = append(*list.out, r)
		}
	}
	return p, nil
}

// loadConfigFile reads path and sets the flags it names on fs (before env
// and command line are applied over them).
func loadConfigFile(path string, fs *flag.FlagSet) (*fileConfig, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return parseConfigFile(b, fs)
}

func parseConfigFile(b []byte, fs *flag.FlagSet) (*fileConfig, error) {
	var fc fileConfig
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&fc); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("config: %w", err)
	}
	for key, v := range fc.Settings {
		name := strings.ReplaceAll(key, "_", "-")
		f := fs.Lookup(name)
		if f == nil || name == "config" {
			return nil, fmt.Errorf("config: unknown key %q", key)
		}
		if err := f.Value.Set(configString(v)); err != nil {
			return nil, fmt.Errorf("config: %s: %w", key, err)
		}
	}
	seen := map[string]bool{}
	for i, u := range fc.Upstreams {
		if u.Name == "" || u.URL == "" {
			return nil, fmt.Errorf("config: upstreams[%d]: name and url are required", i)
		}
		if seen[u.Name] {
			return nil, fmt.Errorf("config: upstream %q is listed twice", u.Name)
		}
		seen[u.Name] = true
		for _, d := range []string{u.TagTTL, u.NegativeTTL} {
			if d != "" {
				if _, err := time.ParseDuration(d); err != nil {
					return nil, fmt.Errorf("config: upstream %q: %w", u.Name, err)
				}
			}
		}
	}
	if fc.DefaultUpstream != "" && !seen[fc.DefaultUpstream] {
		return nil, fmt.Errorf("config: default_upstream %q is not in upstreams", fc.DefaultUpstream)
	}
	return &fc, nil
}

// configString turns a YAML scalar or list into a flag value.
func configString(v any) string {
	switch v := v.(type) {
	case nil:
		return ""
	case []any:
		parts := make([]string, len(v))
		for i, p := range v {
			parts[i] = fmt.Sprint(p)
		}
		return strings.Join(parts, ",")
	}
	return fmt.Sprint(v)
}

// upstreamSpec is an upstream ready to be built.
type upstreamSpec struct {
	name         string
	url          string
	aliases      []string
	auth         authn.Authenticator
	credentials  string // what auth was made of, to tell a changed one
	tagTTL       time.Duration
	negativeTTL  time.Duration
	staleOn404   bool
	maxConc      int
	allowPrivate bool
	policy       *upstream.Policy
}

// upstreamSpecs resolves the configured upstreams and which is the
// default: --upstream (or SLIPWAY_UPSTREAM), when given, names the default
// by URL, adding it if the file does not list it; else default_upstream;
// else the first listed; with no file, --upstream alone (Docker Hub by
// default).
func upstreamSpecs(c *serveConfig) ([]upstreamSpec, int, error) {
	var specs []upstreamSpec
	def := -1
	if fc := c.file; fc != nil {
		for i, u := range fc.Upstreams {
			s, err := specOf(u, c.tagTTL)
			if err != nil {
				return nil, 0, err
			}
			specs = append(specs, s)
			if u.Name == fc.DefaultUpstream {
				def = i
			}
		}
	}
	if c.upstreamSet || len(specs) == 0 {
		def = -1
		for i, s := range specs {
			if sameURL(s.url, c.upstream) {
				def = i
			}
		}
		if def < 0 {
			s, err := specOf(upstreamConfig{Name: redactURL(c.upstream), URL: c.upstream}, c.tagTTL)
			if err != nil {
				return nil, 0, err
			}
			s.name = redactURL(s.url)
			specs = append(specs, s)
			def = len(specs) - 1
		}
	}
	if def < 0 {
		def = 0
	}
	return specs, def, nil
}

func specOf(u upstreamConfig, tagTTL time.Duration) (upstreamSpec, error) {
	pu, err := url.Parse(u.URL)
	if err != nil || pu.Host == "" || (pu.Scheme != "http" && pu.Scheme != "https") {
		return upstreamSpec{}, fmt.Errorf("upstream %q: invalid URL %q: want http(s)://host[:port]", u.Name, redactURL(u.URL))
	}
	if pu.User != nil {
		return upstreamSpec{}, fmt.Errorf("upstream %q: put credentials in username/password, not in the url", u.Name)
	}
	s := upstreamSpec{name: u.Name, url: strings.TrimSuffix(u.URL, "/"), aliases: u.Aliases, tagTTL: tagTTL,
		staleOn404: u.StaleOn404, maxConc: u.MaxConcurrent, allowPrivate: u.AllowPrivate}
	p, err := u.Policy.policy(isDockerHub(s.url))
	if err != nil {
		return upstreamSpec{}, fmt.Errorf("upstream %q: policy: %w", u.Name, err)
	}
	s.policy = p
	if u.TagTTL != "" {
		s.tagTTL, _ = time.ParseDuration(u.TagTTL)
	}
	if u.NegativeTTL != "" {
		s.negativeTTL, _ = time.ParseDuration(u.NegativeTTL)
	}
	password, token := u.Password, u.Token
	if u.PasswordEnv != "" {
		password = os.Getenv(u.PasswordEnv)
		if password == "" {
			return upstreamSpec{}, fmt.Errorf("upstream %q: password_env %s is empty", u.Name, u.PasswordEnv)
		}
	}
	if u.TokenEnv != "" {
		token = os.Getenv(u.TokenEnv)
		if token == "" {
			return upstreamSpec{}, fmt.Errorf("upstream %q: token_env %s is empty", u.Name, u.TokenEnv)
		}
	}
	s.credentials = u.Username + "\x00" + password + "\x00" + token
	switch {
	case token != "":
		s.auth = authn.FromConfig(authn.AuthConfig{RegistryToken: token})
	case u.Username != "" || password != "":
		s.auth = &authn.Basic{Username: u.Username, Password: password}
	}
	return s, nil
}

func sameURL(a, b string) bool {
	return strings.TrimSuffix(a, "/") == strings.TrimSuffix(b, "/")
}

// redactURL hides a password in a URL before it is shown anywhere.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "<unparsable url>"
	}
	return u.Redacted()
}
