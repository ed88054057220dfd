package mirror

import (
	"errors"
	"io"
	"net/http"
	"net/http/httputil"
	"strconv"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/opencontainers/go-digest"

	"slipway/upstream"
)

// The peer listener of a replica in a fleet (--peer-listen): the routes
// the other replicas call. It never serves clients: every request must
// carry the fleet's token, and the client listener has none of these
// routes.
//
//	GET /peer/v1/ping                              alive? (membership)
//	GET /peer/v1/blob?ns=&repo=&digest=            a proxied blob, as a client would get it
//	GET /peer/v1/manifest?ns=&repo=&ref=           a proxied manifest, with X-Slipway-Fetched-At
//	ANY /peer/v1/client/v2/...                     a client request forwarded here (an upload
//	                                               session of this replica)
//
// What a peer asks is answered here and never forwarded again.

// PeerHandler serves the peer listener. It needs Config.Fleet.
func (s *Server) PeerHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /peer/v1/ping", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, s.fleet.ID())
	})
	mux.HandleFunc("GET /peer/v1/blob", s.peerBlob)
	mux.HandleFunc("GET /peer/v1/manifest", s.peerManifest)
	mux.Handle("/peer/v1/client/", http.StripPrefix("/peer/v1/client", s.e))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.fleet == nil || !s.fleet.CheckToken(r) {
			http.Error(w, "not a peer of this fleet", http.StatusUnauthorized)
			return
		}
		r.Header.Del(upstream.PeerTokenHeader)
		mux.ServeHTTP(w, r.WithContext(upstream.WithHop(r.Context())))
	})
}

// peerUpstream finds the upstream a peer names by host.
func (s *Server) peerUpstream(w http.ResponseWriter, r *http.Request) (*Upstream, string, bool) {
	u, ok := s.routing.Load().byName[r.URL.Query().Get("ns")]
	repo := r.URL.Query().Get("repo")
	if !ok || validateName(repo) != nil {
		http.Error(w, "no such upstream or repository", http.StatusNotFound)
		return nil, "", false
	}
	return u, repo, true
}

// peerError answers a peer with the status a client would get.
func peerError(w http.ResponseWriter, err error) {
	oe := toOCI(err, routeBlob)
	http.Error(w, oe.message, oe.code.status)
}

// peerBlob streams a proxied blob to a peer: from the store, or the fill
// this replica runs as its owner (which the peer's clients thereby join).
func (s *Server) peerBlob(w http.ResponseWriter, r *http.Request) {
	u, repo, ok := s.peerUpstream(w, r)
	if !ok {
		return
	}
	d, err := digest.Parse(r.URL.Query().Get("digest"))
	if err != nil {
		http.Error(w, "bad digest", http.StatusBadRequest)
		return
	}
	b, err := u.Proxy.Blob(r.Context(), repo, d)
	if err != nil {
		peerError(w, err)
		return
	}
	defer b.Close()
	w.Header().Set("Docker-Content-Digest", string(d))
	if b.File != nil {
		http.ServeContent(w, r, "", time.Time{}, b.File)
		return
	}
	if b.Size >= 0 {
		w.Header().Set(echo.HeaderContentLength, strconv.FormatInt(b.Size, 10))
	}
	w.WriteHeader(http.StatusOK)
	if _, err := io.Copy(w, b.Reader); err != nil {
		// The fill failed: cut the peer off, as a client would be.
		panic(http.ErrAbortHandler)
	}
}

// peerManifest answers a peer's manifest request as its repository's
// owner: from the cache within the freshness window, else the upstream.
func (s *Server) peerManifest(w http.ResponseWriter, r *http.Request) {
	u, repo, ok := s.peerUpstream(w, r)
	if !ok {
		return
	}
	q := r.URL.Query()
	m, at, src, err := u.Proxy.ManifestForPeer(r.Context(), repo, q.Get("ref"), accepts(r))
	if err != nil {
		peerError(w, err)
		return
	}
	h := w.Header()
	setDescriptorHeaders(h, m.Digest, int64(len(m.Bytes)), m.MediaType)
	h.Set(upstream.FetchedAtHeader, upstream.FormatFetchedAt(at))
	h.Set("X-Slipway-Cache", string(src))
	w.Write(m.Bytes)
}

// forwardUpload sends a request of an upload session that replica owner
// holds to it, and its answer back: sessions live where they began.
func (s *Server) forwardUpload(c echo.Context, owner string) error {
	addr, ok := s.fleet.Replica(owner)
	if !ok {
		return newError(codeUnavailable, "the replica that holds this upload session is unavailable; start the upload again")
	}
	rq := requestOf(c)
	rq.src, rq.hasSrc = upstream.Source("peer "+addr), true
	var failed error
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			s.fleet.Forward(pr.Out, addr)
		},
		Transport:     s.fleet.Transport(),
		FlushInterval: -1,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			failed = err
		},
	}
	rp.ServeHTTP(c.Response(), c.Request())
	if failed != nil && !c.Response().Committed {
		return wrapError(codeUnavailable, "the replica that holds this upload session did not answer", errors.Join(upstream.ErrUnavailable, failed))
	}
	return nil
}
