package main

import (
	"io"
	"testing"
)

// FuzzConfigFile: any config file is parsed or refused with an error; never
// a panic, and upstreams it accepts have a name and a URL.
func FuzzConfigFile(f *testing.F) {
	f.Add([]byte(sampleConfig))
	f.Add([]byte("listen: :5000\n"))
	f.Add([]byte("upstreams: []\n"))
	f.Add([]byte("upstreams:\n  - {name: a, url: 'http://[::1'}\n"))
	f.Add([]byte("tag_ttl: [1, 2]\npush: maybe\n"))
	f.Add([]byte("&a [*a]\n"))
	f.Add([]byte("{"))
	f.Fuzz(func(t *testing.T, b []byte) {
		fs, c := serveFlags(io.Discard)
		fc, err := parseConfigFile(b, fs)
		if err != nil {
			return
		}
		for _, u := range fc.Upstreams {
			if u.Name == "" || u.URL == "" {
				t.Fatalf("accepted upstream %+v", u)
			}
		}
		c.file = fc
		upstreamSpecs(c) // may refuse, must not panic
	})
}
