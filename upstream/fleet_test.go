package upstream

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// Rendezvous hashing: every key has one owner among the replicas, the
// keys spread over them, and a replica that leaves moves only the keys it
// owned (the others keep theirs).
func TestOwnerOf(t *testing.T) {
	addrs := []string{"10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000", "10.0.0.4:7000"}
	owned := map[string]int{}
	before := map[string]string{}
	for i := range 4000 {
		key := fmt.Sprintf("sha256:%064x", i)
		o := OwnerOf(key, addrs)
		owned[o]++
		before[key] = o
	}
	for _, a := range addrs {
		if n := owned[a]; n < 800 || n > 1200 {
			t.Errorf("%s owns %d of 4000 keys", a, n)
		}
	}
	left := addrs[:3]
	for key, o := range before {
		now := OwnerOf(key, left)
		if o != addrs[3] && now != o {
			t.Fatalf("%s moved from %s to %s when another replica left", key, o, now)
		}
	}
	if OwnerOf("x", nil) != "" {
		t.Error("no replicas, yet an owner")
	}
}

// A fleet sees its peers alive once they answer pings with the token, and
// dead once they stop; ownership follows; DNS names the members.
func TestFleetMembership(t *testing.T) {
	var mu sync.Mutex
	up := map[string]bool{}
	var peers []string
	for range 2 {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			ok := up[r.Host]
			mu.Unlock()
			if !ok || r.Header.Get(PeerTokenHeader) != "a-token-of-sixteen" || r.URL.Path != "/peer/v1/ping" {
				w.WriteHeader(http.StatusUnauthorized)
				return
			}
		}))
		t.Cleanup(srv.Close)
		addr := strings.TrimPrefix(srv.URL, "http://")
		peers = append(peers, addr)
		up[addr] = true
	}
	// Both peers listen on 127.0.0.1 with their own ports; DNS gives
	// hosts, so this fleet is named statically and by DNS in turn.
	f, err := NewFleet(FleetConfig{Self: "127.0.0.1:1", Peers: peers, Token: "a-token-of-sixteen"})
	if err != nil {
		t.Fatal(err)
	}
	f.Start()
	defer f.Close()
	if got := f.Alive(); len(got) != 3 {
		t.Fatalf("alive: %v", got)
	}
	key := ""
	for i := 0; ; i++ { // a key a peer owns
		key = fmt.Sprint(i)
		if o, self := f.Owner(key); !self && o == peers[0] {
			break
		}
	}
	mu.Lock()
	up[peers[0]] = false
	mu.Unlock()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) && len(f.Alive()) != 2 {
		time.Sleep(50 * time.Millisecond)
	}
	if got := f.Alive(); len(got) != 2 {
		t.Fatalf("a peer that stopped answering is still alive: %v", got)
	}
	if o, _ := f.Owner(key); o == peers[0] {
		t.Error("a dead peer still owns keys")
	}
	if _, ok := f.Replica(ReplicaID(peers[0])); ok {
		t.Error("a dead replica is offered for its upload sessions")
	}
	if a, ok := f.Replica(ReplicaID(peers[1])); !ok || a != peers[1] {
		t.Errorf("Replica(%s) = %q, %v", ReplicaID(peers[1]), a, ok)
	}

	_, port, _ := net.SplitHostPort(peers[1])
	d, err := NewFleet(FleetConfig{Self: "127.0.0.2:" + port, DNS: "replicas.example", Token: "a-token-of-sixteen",
		Resolve: func(context.Context, string) ([]string, error) { return []string{"127.0.0.1", "127.0.0.2"}, nil }})
	if err != nil {
		t.Fatal(err)
	}
	d.Start()
	defer d.Close()
	if got := d.Alive(); len(got) != 2 || got[0] != peers[1] {
		t.Errorf("by DNS: alive %v, want the peer on 127.0.0.1:%s and itself", got, port)
	}
	if _, err := NewFleet(FleetConfig{Self: "nohostport", Token: "x"}); err == nil {
		t.Error("a peer address without a port was accepted")
	}
}
