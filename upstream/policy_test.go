package upstream

import (
	"regexp"
	"strings"
	"testing"
)

func TestGlob(t *testing.T) {
	for _, c := range []struct {
		pattern, name string
		want          bool
	}{
		{"library/alpine", "library/alpine", true},
		{"library/alpine", "library/alpinex", false},
		{"library/*", "library/alpine", true},
		{"library/*", "library/a/b", false},
		{"library/**", "library/a/b", true},
		{"**", "anything/at/all", true},
		{"**", "", true},
		{"*", "", true},
		{"*", "a/b", false},
		{"org/*/app", "org/team/app", true},
		{"org/*/app", "org/team/sub/app", false},
		{"org/**/app", "org/team/sub/app", true},
		{"org/**/app", "org/app", false}, // "**/" needs a segment
		{"v1.?", "v1.2", true},
		{"v1.?", "v1.22", false},
		{"?", "/", false},
		{"1.*-alpine", "1.22-alpine", true},
		{"1.*-alpine", "1.22", false},
		{"*-rc*", "2.0-rc1", true},
		{"a*a*a*a*a*a*b", strings.Repeat("a", 200), false},
	} {
		if got := Glob(c.pattern, c.name); got != c.want {
			t.Errorf("Glob(%q, %q) = %v, want %v", c.pattern, c.name, got, c.want)
		}
	}
}

func TestPolicy(t *testing.T) {
	rules := func(dockerHub bool, ss ...string) []Rule {
		var out []Rule
		for _, s := range ss {
			r, err := ParseRule(s, dockerHub)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, r)
		}
		return out
	}
	p := &Policy{
		DenyByDefault: true,
		Allow:         rules(true, "alpine", "myorg/**", "golang:1.*"),
		Deny:          rules(true, "myorg/secret", "alpine:*-rc*"),
	}
	for _, c := range []struct {
		repo, tag string
		want      bool
		wantRepo  bool
	}{
		{"library/alpine", "3.20", true, true},
		{"library/alpine", "3.21-rc1", false, true},
		{"library/golang", "1.22", true, true},
		{"library/golang", "latest", false, true},
		{"myorg/app", "v1", true, true},
		{"myorg/team/app", "v1", true, true},
		{"myorg/secret", "v1", false, false},
		{"library/nginx", "latest", false, false},
		{"alpine", "3.20", false, false}, // rules name the upstream's spelling
	} {
		if got := p.Allows(c.repo, c.tag); got != c.want {
			t.Errorf("Allows(%q, %q) = %v, want %v", c.repo, c.tag, got, c.want)
		}
		if got := p.AllowsRepo(c.repo); got != c.wantRepo {
			t.Errorf("AllowsRepo(%q) = %v, want %v", c.repo, got, c.wantRepo)
		}
	}
	var none *Policy
	if !none.Allows("x", "y") || !none.AllowsRepo("x") || !(&Policy{}).Allows("x", "y") {
		t.Error("no policy must allow everything")
	}
	for _, bad := range []string{"", ":tag", "repo:", "re po", "repo@sha256:x", "repo:a/b", "repo:a:b"} {
		if _, err := ParseRule(bad, false); err == nil {
			t.Errorf("ParseRule(%q) accepted", bad)
		}
	}
}

// globRegexp is an independent statement of Glob's meaning, for the fuzz
// target's oracle.
func globRegexp(pattern string) *regexp.Regexp {
	var b strings.Builder
	b.WriteString(`\A`)
	for i := 0; i < len(pattern); i++ {
		switch {
		case strings.HasPrefix(pattern[i:], "**"):
			b.WriteString(`(?s:.*)`)
			i++
		case pattern[i] == '*':
			b.WriteString(`[^/]*`)
		case pattern[i] == '?':
			b.WriteString(`[^/]`)
		default:
			b.WriteString(regexp.QuoteMeta(pattern[i : i+1]))
		}
	}
	b.WriteString(`\z`)
	return regexp.MustCompile(b.String())
}

// FuzzGlob: Glob agrees with a regular expression built from the same
// pattern, and never panics. Names and patterns are ASCII, as repository
// names and tags are (Glob works on bytes, the regexp on runes).
func FuzzGlob(f *testing.F) {
	for _, s := range [][2]string{{"library/*", "library/alpine"}, {"**/app", "a/b/app"}, {"v?.*", "v1.2"}, {"a**b*", "axyb/c"}, {"*?*", "/"}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, pattern, name string) {
		if len(pattern) > 64 || len(name) > 128 || !ascii(pattern) || !ascii(name) {
			return
		}
		want := globRegexp(pattern).MatchString(name)
		if got := Glob(pattern, name); got != want {
			t.Fatalf("Glob(%q, %q) = %v, the regexp says %v", pattern, name, got, want)
		}
	})
}

func ascii(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}
