package upstream

import (
	"errors"
	"fmt"
	"strings"
)

// Policy is an upstream's pull-through policy: which of its repositories
// and tags may enter the cache and be served from it. A deny rule that
// matches wins; else an allow rule that matches allows; else DenyByDefault
// decides. The zero Policy allows everything.
//
// Rules are written against the upstream's own names, as the mirror
// resolves every spelling of a name to them (Docker Hub: "alpine" is
// "library/alpine").
type Policy struct {
	DenyByDefault bool
	Allow, Deny   []Rule
}

// Rule matches repositories, and optionally tags, by glob: "*" matches
// within one path segment, "**" across segments, "?" one character. An
// empty Tag matches every tag.
type Rule struct {
	Repo, Tag string
}

// ErrPolicy is a rule that cannot be read.
var ErrPolicy = errors.New("upstream: invalid policy rule")

// ParseRule reads "repo-glob" or "repo-glob:tag-glob". dockerHub makes a
// one-segment repository an official image ("alpine" is "library/alpine"),
// as the mirror does with names.
func ParseRule(s string, dockerHub bool) (Rule, error) {
	repo, tag, hasTag := strings.Cut(strings.TrimSpace(s), ":")
	switch {
	case repo == "" || (hasTag && tag == ""):
		return Rule{}, fmt.Errorf("%w: %q: want repository[:tag], each a glob", ErrPolicy, s)
	case len(repo) > 512 || len(tag) > 256:
		return Rule{}, fmt.Errorf("%w: %q is too long", ErrPolicy, s)
	case strings.ContainsAny(repo, " \t@") || strings.ContainsAny(tag, " \t/@:"):
		return Rule{}, fmt.Errorf("%w: %q: a repository glob has no spaces or '@', a tag glob no '/' or ':'", ErrPolicy, s)
	}
	if dockerHub && !strings.Contains(repo, "/") && repo != "**" {
		repo = "library/" + repo
	}
	return Rule{Repo: repo, Tag: tag}, nil
}

func (r Rule) String() string {
	if r.Tag == "" {
		return r.Repo
	}
	return r.Repo + ":" + r.Tag
}

// Allows reports whether repo:tag may be pulled through.
func (p *Policy) Allows(repo, tag string) bool {
	if p == nil {
		return true
	}
	for _, r := range p.Deny {
		if Glob(r.Repo, repo) && (r.Tag == "" || Glob(r.Tag, tag)) {
			return false
		}
	}
	for _, r := range p.Allow {
		if Glob(r.Repo, repo) && (r.Tag == "" || Glob(r.Tag, tag)) {
			return true
		}
	}
	return !p.DenyByDefault
}

// AllowsRepo reports whether anything of repo may be pulled through: what
// no tag names (a manifest or blob by digest, referrers, the tag list).
// Deny rules with a tag pattern do not deny the repository, and allow
// rules with one allow it.
func (p *Policy) AllowsRepo(repo string) bool {
	if p == nil {
		return true
	}
	for _, r := range p.Deny {
		if r.Tag == "" && Glob(r.Repo, repo) {
			return false
		}
	}
	for _, r := range p.Allow {
		if Glob(r.Repo, repo) {
			return true
		}
	}
	return !p.DenyByDefault
}

// Glob reports whether name matches pattern: "**" matches any run of
// characters, "*" any run without '/', "?" one character other than '/';
// every other character itself. It runs in time linear in the product of
// the lengths at worst (no backtracking blow-up).
func Glob(pattern, name string) bool {
	// Positions in the pattern reachable after each character of name:
	// a set, advanced one character at a time (an NFA walk).
	cur := closure(pattern, []int{0})
	for i := 0; i < len(name) && len(cur) > 0; i++ {
		c := name[i]
		var next []int
		for _, p := range cur {
			switch {
			case p >= len(pattern):
			case strings.HasPrefix(pattern[p:], "**"):
				next = append(next, p) // stays on "**"
			case pattern[p] == '*':
				if c != '/' {
					next = append(next, p)
				}
			case pattern[p] == '?':
				if c != '/' {
					next = append(next, p+1)
				}
			case pattern[p] == c:
				next = append(next, p+1)
			}
		}
		cur = closure(pattern, next)
	}
	for _, p := range cur {
		if p == len(pattern) {
			return true
		}
	}
	return false
}

// closure adds to ps the positions reachable by letting a '*' or "**"
// match nothing, without repeats.
func closure(pattern string, ps []int) []int {
	seen := make(map[int]bool, len(ps))
	var out []int
	for len(ps) > 0 {
		p := ps[len(ps)-1]
		ps = ps[:len(ps)-1]
		if seen[p] {
			continue
		}
		seen[p] = true
		out = append(out, p)
		switch {
		case strings.HasPrefix(pattern[min(p, len(pattern)):], "**"):
			ps = append(ps, p+2)
		case p < len(pattern) && pattern[p] == '*':
			ps = append(ps, p+1)
		}
	}
	return out
}
