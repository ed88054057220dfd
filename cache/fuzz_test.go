package cache

import "testing"

// FuzzReferences: any bytes give what a manifest holds or ErrBadManifest,
// never a panic; everything returned is a valid digest (so it can go into
// a key and a path), held once, and a layer the manifest calls
// non-distributable is never held.
func FuzzReferences(f *testing.F) {
	f.Add([]byte(`{"config":{"digest":"sha256:abc"},"layers":[{"digest":"sha256:def"}],"subject":{"digest":"x"}}`))
	f.Add([]byte(`{"manifests":[{"digest":""},{}]}`))
	f.Add([]byte(`{"layers":[{"mediaType":"a.foreign.b","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000"}]}`))
	f.Add([]byte(`null`))
	f.Add([]byte(`[`))
	f.Fuzz(func(t *testing.T, b []byte) {
		held, subject, err := References(b)
		if err != nil {
			return
		}
		seen := map[string]bool{}
		for _, r := range held {
			if err := r.Digest.Validate(); err != nil {
				t.Fatalf("held %q: %v", r.Digest, err)
			}
			if seen[string(r.Digest)] {
				t.Fatalf("%s held twice", r.Digest)
			}
			seen[string(r.Digest)] = true
		}
		if subject != "" {
			if err := subject.Validate(); err != nil {
				t.Fatalf("subject %q: %v", subject, err)
			}
		}
	})
}
