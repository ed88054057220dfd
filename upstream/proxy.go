package upstream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"mime"
	"regexp"
	"slices"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/singleflight"

	"slipway/cache"
)

// Source says how a request was answered; it goes into logs and metrics.
type Source string

const (
	SourceHit         Source = "hit"         // from the cache, fresh
	SourceRevalidated Source = "revalidated" // from the cache after the upstream confirmed it
	SourceStale       Source = "stale"       // from the cache because the upstream failed
	SourceMiss        Source = "miss"        // fetched from the upstream for this request
	SourceJoined      Source = "joined"      // joined a fetch another request started
	SourceUpstream    Source = "upstream"    // answered by the upstream, nothing stored (HEAD)
)

// ProxyOptions tune a Proxy. The zero value is usable.
type ProxyOptions struct {
	Logger *slog.Logger
	// TagTTL is how long a tag is served without asking the upstream.
	// Default 5 minutes.
	TagTTL time.Duration
	// ManifestTimeout bounds one manifest fetch. Default 60 seconds.
	ManifestTimeout time.Duration
	// NegativeTTL is how long an upstream's "not found" for a tag, digest
	// or blob is remembered. Default 15 seconds; negative: not at all.
	NegativeTTL time.Duration
	// StaleOn404 serves a cached tag when the upstream says it no longer
	// exists (default: the 404 is passed on).
	StaleOn404 bool
	// Now is the clock; tests inject one. Default time.Now.
	Now func() time.Time
	// Fleet, if set, sends the manifest fetches and tag revalidations of a
	// repository this replica does not own to its owner, so that an
	// upstream's manifest limits are spent once per fleet.
	Fleet *Fleet
}

// Proxy serves one upstream's repositories through the cache.
type Proxy struct {
	up       *Client
	store    *cache.Store
	fills    *Filler
	log      *slog.Logger
	tagTTL   time.Duration
	timeout  time.Duration
	now      func() time.Time
	flights  singleflight.Group
	neg      *negativeCache
	stale404 bool
	fleet    *Fleet
}

// NewProxy serves up through store, filling blobs with fills (shared by
// every upstream, since a digest is the same content wherever it came from).
func NewProxy(up *Client, store *cache.Store, fills *Filler, o ProxyOptions) *Proxy {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.TagTTL <= 0 {
		o.TagTTL = 5 * time.Minute
	}
	if o.ManifestTimeout <= 0 {
		o.ManifestTimeout = 60 * time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.NegativeTTL == 0 {
		o.NegativeTTL = 15 * time.Second
	}
	return &Proxy{up: up, store: store, fills: fills, log: o.Logger,
		tagTTL: o.TagTTL, timeout: o.ManifestTimeout, now: o.Now,
		neg: newNegativeCache(o.NegativeTTL, o.Now), stale404: o.StaleOn404, fleet: o.Fleet}
}

// errRemembered answers from the negative cache.
var errRemembered = fmt.Errorf("%w (the upstream said so a moment ago)", ErrNotFound)

// remember records a "not found" from the upstream under key.
func (p *Proxy) remember(key string, err error) error {
	if errors.Is(err, ErrNotFound) {
		p.neg.add(key)
	}
	return err
}

func negKey(kind, repo, ref string) string { return kind + "\x00" + repo + "\x00" + ref }

// Upstream is the proxied registry's client.
func (p *Proxy) Upstream() *Client { return p.up }

func (p *Proxy) ns() string { return p.up.Host() }

// Blob returns blob d of repo: from the cache, or from a fill that streams it
// while it downloads. A stored blob is served under repo only if repo
// references it or the upstream confirms repo has it.
func (p *Proxy) Blob(ctx context.Context, repo string, d digest.Digest) (*Blob, error) {
	file, info, err := p.store.OpenBlob(d)
	if err == nil {
		if err := confirmBlob(ctx, p.store, p.up, repo, d); err != nil {
			file.Close()
			return nil, err
		}
		return &Blob{File: file, Size: info.Size, Source: SourceHit}, nil
	}
	if !errors.Is(err, cache.ErrNotFound) {
		return nil, err
	}
	key := negKey("b", repo, string(d))
	if p.neg.has(key) {
		return nil, errRemembered
	}
	b, err := p.fills.fetch(ctx, p.up, repo, d)
	return b, p.remember(key, err)
}

// Tags lists repo's tags, sorted: the upstream's whole list, asked again
// once it is older than the tag freshness window, and kept. When the
// upstream fails (down, timing out, 5xx, 429) the last list is served
// stale, together with the tags slipway has cached since: a client that
// lists tags before it pulls (skopeo inspect, crane ls) goes on working.
func (p *Proxy) Tags(ctx context.Context, repo string) ([]string, Source, error) {
	cached, at, err := p.store.TagList(p.ns(), repo)
	have := err == nil
	if have && p.now().Sub(at) < p.tagTTL {
		return tagSet(cached), SourceHit, nil
	}
	v, shared, err := p.flight(ctx, "l\x00"+repo, func(ctx context.Context) (any, error) {
		tags, err := p.up.Tags(ctx, repo)
		if err != nil {
			return nil, err
		}
		return tags, p.store.SetTagList(p.ns(), repo, tags, p.now())
	})
	if err == nil {
		return tagSet(v.([]string)), sourceOf(shared), nil
	}
	if !p.staleable(err) {
		return nil, "", err
	}
	held, herr := p.store.Tags(p.ns(), repo, "", 0)
	if herr != nil {
		return nil, "", herr
	}
	if !have && len(held) == 0 {
		return nil, "", err
	}
	p.log.Warn("serving stale tag list", "upstream", p.ns(), "repo", repo, "err", err)
	return tagSet(append(cached, held...)), SourceStale, nil
}

// tagSet sorts tags and drops repeats and names that are not tags.
func tagSet(tags []string) []string {
	out := make([]string, 0, len(tags))
	for _, t := range tags {
		if tagName.MatchString(t) {
			out = append(out, t)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

var tagName = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)

// Referrers lists the manifests that refer to subject in repo: what the
// upstream's referrers API answers, or, for an upstream without one, the
// index its referrers tag (sha256-<hex>) points at; together with the
// referrers slipway pulled itself (manifests of repo with that subject).
// It is kept like a tag: fresh for the tag freshness window, then asked
// again, and served stale when the upstream fails. Nothing referring to
// subject is an empty list, never "not found".
func (p *Proxy) Referrers(ctx context.Context, repo string, subject digest.Digest) ([]v1.Descriptor, Source, error) {
	held, err := p.store.ReferrerDescriptors(p.ns(), repo, subject)
	if err != nil {
		return nil, "", err
	}
	cached, at, err := p.store.CachedReferrers(p.ns(), repo, subject)
	have := err == nil
	if have && p.now().Sub(at) < p.tagTTL {
		return append(parseReferrers(cached), held...), SourceHit, nil
	}
	v, shared, err := p.flight(ctx, "r\x00"+repo+"\x00"+string(subject), func(ctx context.Context) (any, error) {
		return p.fetchReferrers(ctx, repo, subject)
	})
	if err == nil {
		return append(v.([]v1.Descriptor), held...), sourceOf(shared), nil
	}
	if !p.staleable(err) && !errors.Is(err, ErrNotFound) {
		return nil, "", err
	}
	p.log.Warn("serving stale referrers", "upstream", p.ns(), "repo", repo, "digest", subject, "err", err)
	return append(parseReferrers(cached), held...), SourceStale, nil
}

// fetchReferrers asks the upstream for subject's referrers and keeps the
// answer.
func (p *Proxy) fetchReferrers(ctx context.Context, repo string, subject digest.Digest) ([]v1.Descriptor, error) {
	b, ok, err := p.up.Referrers(ctx, repo, subject)
	if err != nil {
		return nil, err
	}
	var descs []v1.Descriptor
	if ok {
		var idx v1.IndexManifest
		if err := json.Unmarshal(b, &idx); err != nil {
			return nil, fmt.Errorf("%w: referrers of %s: %v", ErrBadResponse, subject, err)
		}
		descs = idx.Manifests
	} else {
		// No referrers API: the tag schema. The index a tag names is
		// fetched, stored and revalidated as any tag's manifest is.
		m, _, err := p.manifestByTag(ctx, repo, referrersTag(subject), []string{mediaTypeOCIIndex})
		switch {
		case errors.Is(err, ErrNotFound):
		case err != nil:
			return nil, err
		default:
			var idx v1.IndexManifest
			if json.Unmarshal(m.Bytes, &idx) == nil {
				descs = idx.Manifests
			}
		}
	}
	descs = validReferrers(descs)
	b, err = json.Marshal(descs)
	if err != nil {
		return nil, err
	}
	return descs, p.store.SetReferrers(p.ns(), repo, subject, b, p.now())
}

// referrersTag is the tag of the referrers tag schema: the digest with
// its ':' made a '-', at most 128 characters.
func referrersTag(d digest.Digest) string {
	t := string(d.Algorithm()) + "-" + d.Encoded()
	return t[:min(len(t), 128)]
}

// validReferrers keeps the descriptors whose digest is one.
func validReferrers(descs []v1.Descriptor) []v1.Descriptor {
	out := []v1.Descriptor{}
	for _, d := range descs {
		if digest.Digest(d.Digest.String()).Validate() == nil {
			out = append(out, d)
		}
	}
	return out
}

func parseReferrers(b []byte) []v1.Descriptor {
	var descs []v1.Descriptor
	json.Unmarshal(b, &descs)
	return descs
}

// HeadBlob says whether repo has blob d and its size. An uncached blob is
// asked of the upstream with a HEAD; nothing is stored.
func (p *Proxy) HeadBlob(ctx context.Context, repo string, d digest.Digest) (Descriptor, Source, error) {
	if info, err := p.store.StatBlob(d); err == nil {
		if linked, err := p.store.Linked(p.ns(), repo, d); err == nil && linked {
			return Descriptor{Digest: d, Size: info.Size}, SourceHit, nil
		}
	}
	key := negKey("b", repo, string(d))
	if p.neg.has(key) {
		return Descriptor{}, "", errRemembered
	}
	desc, err := p.up.HeadBlob(ctx, repo, d)
	return desc, SourceUpstream, p.remember(key, err)
}

// Manifest returns manifest ref (a tag or a digest) of repo. A digest is
// immutable: once stored it is never asked for again. A tag is served from
// the cache within its freshness window, then revalidated with a HEAD; if
// the upstream is down, times out, answers 5xx or 429, the last known
// manifest is served (stale). The manifest's bytes may be shared with
// other callers (the cache's copy in memory, a fetch others joined): read
// them, never change them.
func (p *Proxy) Manifest(ctx context.Context, repo, ref string, accept []string) (cache.Manifest, Source, error) {
	if d, err := digest.Parse(ref); err == nil {
		return p.manifestByDigest(ctx, repo, d, accept)
	}
	return p.manifestByTag(ctx, repo, ref, accept)
}

func (p *Proxy) manifestByDigest(ctx context.Context, repo string, d digest.Digest, accept []string) (cache.Manifest, Source, error) {
	if m, err := p.store.GetManifestReadOnly(d); err == nil {
		if err := p.confirmManifest(ctx, repo, d); err != nil {
			return cache.Manifest{}, "", err
		}
		p.store.Touch(d)
		return m, SourceHit, nil
	} else if !errors.Is(err, cache.ErrNotFound) {
		return cache.Manifest{}, "", err
	}
	key := negKey("m", repo, string(d))
	if p.neg.has(key) {
		return cache.Manifest{}, "", errRemembered
	}
	hop := IsHop(ctx)
	v, shared, err := p.flight(ctx, "d\x00"+repo+"\x00"+string(d)+hopKeyPart(hop), func(ctx context.Context) (any, error) {
		if m, _, ok, err := p.viaOwner(ctx, hop, repo, string(d), withAll(accept)); ok {
			return m, err
		}
		return p.fetchManifest(ctx, repo, string(d), withAll(accept))
	})
	if err != nil {
		return cache.Manifest{}, "", p.remember(key, err)
	}
	return v.(cache.Manifest), sourceOf(shared), nil
}

func (p *Proxy) confirmManifest(ctx context.Context, repo string, d digest.Digest) error {
	ok, err := p.store.Linked(p.ns(), repo, d)
	if err != nil || ok {
		return err
	}
	if _, err := p.up.HeadManifest(ctx, repo, string(d), nil); err != nil {
		return err
	}
	return p.store.Link(p.ns(), repo, d)
}

type tagResult struct {
	m   cache.Manifest
	src Source
}

func (p *Proxy) manifestByTag(ctx context.Context, repo, tag string, accept []string) (cache.Manifest, Source, error) {
	cached, t, ok := p.cachedTag(repo, tag, accept)
	if ok && p.now().Sub(t.FetchedAt) < p.tagTTL {
		return cached, SourceHit, nil
	}
	nkey := negKey("m", repo, tag)
	if !ok && p.neg.has(nkey) {
		return cache.Manifest{}, "", errRemembered
	}
	hop := IsHop(ctx)
	key := "t\x00" + repo + "\x00" + tag + "\x00" + strings.Join(accept, ",") + hopKeyPart(hop)
	v, shared, err := p.flight(ctx, key, func(ctx context.Context) (any, error) {
		if r, ok, err := p.revalidateViaOwner(ctx, hop, repo, tag, accept, cached, ok); ok {
			return r, err
		}
		return p.revalidate(ctx, repo, tag, accept, cached, ok)
	})
	if err != nil {
		return cache.Manifest{}, "", p.remember(nkey, err)
	}
	r := v.(tagResult)
	if shared && r.src == SourceMiss {
		r.src = SourceJoined
	}
	return r.m, r.src, nil
}

// cachedTag returns the stored manifest tag points at, if it is acceptable
// to this client.
func (p *Proxy) cachedTag(repo, tag string, accept []string) (cache.Manifest, cache.Tag, bool) {
	t, err := p.store.GetTag(p.ns(), repo, tag)
	if err != nil {
		return cache.Manifest{}, cache.Tag{}, false
	}
	m, err := p.store.GetManifestReadOnly(t.Digest)
	if err != nil || !Acceptable(m.MediaType, accept) {
		return cache.Manifest{}, cache.Tag{}, false
	}
	p.store.Touch(t.Digest)
	return m, t, true
}

func (p *Proxy) revalidate(ctx context.Context, repo, tag string, accept []string, cached cache.Manifest, haveCached bool) (tagResult, error) {
	if haveCached {
		desc, err := p.up.HeadManifest(ctx, repo, tag, accept)
		switch {
		case err == nil && desc.Digest == cached.Digest:
			err := p.store.SetTag(p.ns(), repo, tag, cache.Tag{Digest: cached.Digest, FetchedAt: p.now()})
			if err == nil {
				return tagResult{cached, SourceRevalidated}, nil
			}
			if !errors.Is(err, cache.ErrNotFound) {
				return tagResult{}, err
			}
			// Evicted since it was read: fetch it again.
		case err == nil:
			// The tag moved (or the upstream did not say where): fetch it.
		case p.staleable(err):
			p.log.Warn("serving stale tag", "upstream", p.ns(), "repo", repo, "ref", tag, "digest", cached.Digest, "err", err)
			return tagResult{cached, SourceStale}, nil
		default:
			return tagResult{}, err
		}
	}
	m, err := p.fetchManifest(ctx, repo, tag, accept)
	if err != nil {
		if haveCached && p.staleable(err) {
			p.log.Warn("serving stale tag", "upstream", p.ns(), "repo", repo, "ref", tag, "digest", cached.Digest, "err", err)
			return tagResult{cached, SourceStale}, nil
		}
		return tagResult{}, err
	}
	// A client that accepts no index gets one platform's manifest where the
	// tag may name an index: don't let that decide what the tag means for
	// everyone else.
	broad := len(accept) == 0 || Acceptable(mediaTypeOCIIndex, accept) || Acceptable(mediaTypeDockerList, accept)
	if broad || isIndex(m.MediaType) {
		err := p.store.SetTag(p.ns(), repo, tag, cache.Tag{Digest: m.Digest, FetchedAt: p.now()})
		if err != nil && !errors.Is(err, cache.ErrNotFound) { // evicted at once: served, not tagged
			return tagResult{}, err
		}
	}
	return tagResult{m, SourceMiss}, nil
}

func hopKeyPart(hop bool) string {
	if hop {
		return "\x00hop"
	}
	return ""
}

// viaOwner asks the owner of repo in the fleet for manifest ref, when that
// is another replica (and this request did not come from a peer), and
// stores what it answers. ok is false when it is not asked, or cannot be
// reached: then this replica asks the upstream itself.
func (p *Proxy) viaOwner(ctx context.Context, hop bool, repo, ref string, accept []string) (cache.Manifest, time.Time, bool, error) {
	if p.fleet == nil || hop {
		return cache.Manifest{}, time.Time{}, false, nil
	}
	owner, self := p.fleet.Owner(p.ns() + "/" + repo)
	if self {
		return cache.Manifest{}, time.Time{}, false, nil
	}
	m, at, err := p.fleet.GetManifest(ctx, owner, p.ns(), repo, ref, accept)
	if errors.Is(err, ErrPeerDown) {
		p.log.Warn("fleet: the owner is unreachable: asking the upstream", "peer", owner, "repo", repo, "ref", ref, "err", err)
		return cache.Manifest{}, time.Time{}, false, nil
	}
	if err != nil {
		return cache.Manifest{}, time.Time{}, true, err
	}
	err = p.store.PutManifest(cache.ManifestPut{NS: p.ns(), Repo: repo, Manifest: m, FromShared: true})
	if errors.Is(err, cache.ErrBadManifest) || errors.Is(err, cache.ErrBadMediaType) {
		err = fmt.Errorf("%w: %v", ErrBadResponse, err)
	}
	return m, at, true, err
}

// revalidateViaOwner is revalidate done by repo's owner in the fleet: it
// answers from its own cache within the freshness window, so the upstream
// is asked once per fleet. ok is false when this replica does it itself.
func (p *Proxy) revalidateViaOwner(ctx context.Context, hop bool, repo, tag string, accept []string, cached cache.Manifest, haveCached bool) (tagResult, bool, error) {
	m, at, ok, err := p.viaOwner(ctx, hop, repo, tag, accept)
	if !ok {
		return tagResult{}, false, nil
	}
	if err != nil {
		if haveCached && p.staleable(err) {
			p.log.Warn("serving stale tag", "upstream", p.ns(), "repo", repo, "ref", tag, "digest", cached.Digest, "err", err)
			return tagResult{cached, SourceStale}, true, nil
		}
		return tagResult{}, true, err
	}
	broad := len(accept) == 0 || Acceptable(mediaTypeOCIIndex, accept) || Acceptable(mediaTypeDockerList, accept)
	if broad || isIndex(m.MediaType) {
		err := p.store.SetTagFromPeer(p.ns(), repo, tag, cache.Tag{Digest: m.Digest, FetchedAt: at})
		if err != nil && !errors.Is(err, cache.ErrNotFound) {
			return tagResult{}, true, err
		}
	}
	src := SourceMiss
	if haveCached && m.Digest == cached.Digest {
		src = SourceRevalidated
	}
	return tagResult{m, src}, true, nil
}

// ManifestForPeer answers a peer's request for manifest ref of repo (a
// replica that does not own the repository): as a client would be
// answered, never asking another peer, with when the tag (if ref is one)
// was last confirmed.
func (p *Proxy) ManifestForPeer(ctx context.Context, repo, ref string, accept []string) (cache.Manifest, time.Time, Source, error) {
	ctx = WithHop(ctx)
	m, src, err := p.Manifest(ctx, repo, ref, accept)
	if err != nil {
		return m, time.Time{}, src, err
	}
	at := p.now()
	if _, derr := digest.Parse(ref); derr != nil {
		if t, err := p.store.GetTag(p.ns(), repo, ref); err == nil && t.Digest == m.Digest {
			at = t.FetchedAt
		}
	}
	return m, at, src, nil
}

// fetchManifest downloads repo:ref, stores it and links repo to it and to
// everything it holds (not its subject: see cache.References).
func (p *Proxy) fetchManifest(ctx context.Context, repo, ref string, accept []string) (cache.Manifest, error) {
	desc, b, err := p.up.GetManifest(ctx, repo, ref, accept)
	if err != nil {
		return cache.Manifest{}, err
	}
	m := cache.Manifest{Digest: desc.Digest, MediaType: desc.MediaType, Bytes: b, Origin: cache.OriginPulled}
	err = p.store.PutManifest(cache.ManifestPut{NS: p.ns(), Repo: repo, Manifest: m})
	if errors.Is(err, cache.ErrBadManifest) || errors.Is(err, cache.ErrBadMediaType) {
		return cache.Manifest{}, fmt.Errorf("%w: %v", ErrBadResponse, err)
	}
	if err != nil {
		return cache.Manifest{}, err
	}
	return m, nil
}

// HeadManifest answers a HEAD for repo:ref. A manifest by digest that is
// not cached is asked of the upstream with a HEAD and nothing is stored; a
// tag is resolved exactly as for a GET.
func (p *Proxy) HeadManifest(ctx context.Context, repo, ref string, accept []string) (Descriptor, Source, error) {
	if d, err := digest.Parse(ref); err == nil {
		if m, err := p.store.GetManifestReadOnly(d); err == nil {
			if err := p.confirmManifest(ctx, repo, d); err != nil {
				return Descriptor{}, "", err
			}
			return descOf(m), SourceHit, nil
		}
		key := negKey("m", repo, ref)
		if p.neg.has(key) {
			return Descriptor{}, "", errRemembered
		}
		desc, err := p.up.HeadManifest(ctx, repo, ref, withAll(accept))
		return desc, SourceUpstream, p.remember(key, err)
	}
	// A tag is resolved as for a GET: fetched and stored when it is not
	// fresh. containerd pulls with a HEAD by tag, then a GET by digest:
	// so that costs one upstream request, not two, and the tag is cached
	// for when the upstream is down.
	m, src, err := p.manifestByTag(ctx, repo, ref, accept)
	if err != nil {
		return Descriptor{}, "", err
	}
	return descOf(m), src, nil
}

func descOf(m cache.Manifest) Descriptor {
	return Descriptor{Digest: m.Digest, Size: int64(len(m.Bytes)), MediaType: m.MediaType}
}

// flight runs fn once per key at a time, on a context detached from the
// callers' (a client that leaves does not cancel a fetch others wait for).
func (p *Proxy) flight(ctx context.Context, key string, fn func(context.Context) (any, error)) (any, bool, error) {
	ch := p.flights.DoChan(key, func() (any, error) {
		fctx, cancel := context.WithTimeout(p.fills.ctx, p.timeout)
		defer cancel()
		return fn(fctx)
	})
	select {
	case r := <-ch:
		return r.Val, r.Shared, r.Err
	case <-ctx.Done():
		return nil, false, ctx.Err()
	}
}

func sourceOf(shared bool) Source {
	if shared {
		return SourceJoined
	}
	return SourceMiss
}

// staleable is Staleable, plus "not found" when StaleOn404 is set.
func (p *Proxy) staleable(err error) bool {
	return Staleable(err) || (p.stale404 && errors.Is(err, ErrNotFound))
}

// Staleable reports whether err is an upstream failure that a cached tag
// may be served through: down, timing out, 5xx or 429.
func Staleable(err error) bool {
	return errors.Is(err, ErrUnavailable) || errors.Is(err, ErrRateLimited) ||
		errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrBadResponse)
}

const (
	mediaTypeOCIIndex   = "application/vnd.oci.image.index.v1+json"
	mediaTypeDockerList = "application/vnd.docker.distribution.manifest.list.v2+json"
)

func isIndex(mt string) bool { return mt == mediaTypeOCIIndex || mt == mediaTypeDockerList }

// withAll adds every manifest type to accept: for a digest the content is
// fixed, so no client's Accept should make the upstream refuse it.
func withAll(accept []string) []string {
	out := append([]string{}, accept...)
	for _, t := range ManifestTypes {
		if !Acceptable(t, accept) || len(accept) == 0 {
			out = append(out, t)
		}
	}
	return out
}

// Acceptable reports whether media type mt satisfies an Accept list (each
// entry one media range; parameters ignored). No Accept accepts anything.
func Acceptable(mt string, accept []string) bool {
	if len(accept) == 0 || slices.Contains(accept, mt) {
		return true
	}
	for _, a := range accept {
		if r, ok := MediaRange(a); ok && Covers(r, mt) {
			return true
		}
	}
	return false
}

// Covers reports whether media range r, as MediaRange reads it, takes
// media type mt.
func Covers(r, mt string) bool {
	return r == "*/*" || r == mt || (strings.HasSuffix(r, "/*") && strings.HasPrefix(mt, strings.TrimSuffix(r, "*")))
}

// MediaRange reads one Accept entry as mime.ParseMediaType does: the media
// range lowercased, without its parameters; ok is false if the entry is
// not one. What clients send, a plain lowercase "type/subtype", is
// recognised without mime.ParseMediaType, which allocates a map of
// parameters on every call: a warm pull by tag asks this a dozen times.
func MediaRange(a string) (string, bool) {
	a = strings.TrimSpace(a)
	if slices.Contains(AcceptedTypes, a) || plainMediaType(a) {
		return a, true
	}
	r, _, err := mime.ParseMediaType(a)
	return r, err == nil
}

// plainMediaType reports whether s is "type/subtype" in lowercase token
// characters (RFC 2045), nothing else: mime.ParseMediaType would return it
// as it is.
func plainMediaType(s string) bool {
	slash := -1
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '/' && slash < 0:
			slash = i
		case !lowerTokenChar[c]:
			return false
		}
	}
	return slash > 0 && slash < len(s)-1
}

// lowerTokenChar marks RFC 2045's token characters but uppercase letters.
var lowerTokenChar = func() (t [256]bool) {
	for c := byte('!'); c <= '~'; c++ {
		t[c] = strings.IndexByte(`()<>@,;:\"/[]?=`, c) < 0 && (c < 'A' || c > 'Z')
	}
	return t
}()
