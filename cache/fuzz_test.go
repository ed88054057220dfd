package cache

import "testing"

// FuzzManifestReferences: any bytes give references or an error, never a
// panic; every reference is a string a digest could be (callers validate).
func FuzzManifestReferences(f *testing.F) {
	f.Add([]byte(`{"config":{"digest":"sha256:abc"},"layers":[{"digest":"sha256:def"}],"subject":{"digest":"x"}}`))
	f.Add([]byte(`{"manifests":[{"digest":""},{}]}`))
	f.Add([]byte(`null`))
	f.Add([]byte(`[`))
	f.Fuzz(func(t *testing.T, b []byte) {
		refs, err := ManifestReferences(b)
		if err != nil {
			return
		}
		for _, r := range refs {
			if r == "" {
				t.Fatal("empty reference returned")
			}
		}
	})
}
