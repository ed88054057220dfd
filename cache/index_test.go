package cache

import (
	"path/filepath"
	"testing"

	"github.com/dgraph-io/badger/v4"
	"github.com/opencontainers/go-digest"
)

// An index an older slipway wrote with compressed tables opens, reads and
// counts as before: badger reads each table with the compression it was
// written with.
func TestIndexWrittenCompressedStillReads(t *testing.T) {
	dir := t.TempDir()
	m := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}`)
	d := digest.FromBytes(m)
	v, err := encodeManifest(Manifest{Digest: d, MediaType: ociManifest, Bytes: m, Origin: OriginPulled})
	if err != nil {
		t.Fatal(err)
	}
	db, err := badger.Open(badger.DefaultOptions(filepath.Join(dir, "index")).WithLogger(nil)) // Snappy, with a block cache
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(txn *badger.Txn) error {
		if err := txn.Set(keyVersion(), []byte{indexVersion}); err != nil {
			return err
		}
		return txn.Set(keyManifest(d), v)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil { // the memtable goes to a compressed table
		t.Fatal(err)
	}

	s := openLife(t, dir, Options{})
	if len(s.ix.db.Tables()) == 0 {
		t.Fatal("no table: the test reads nothing the old options wrote")
	}
	got, err := s.GetManifest(d)
	if err != nil || string(got.Bytes) != string(m) {
		t.Fatalf("GetManifest = %q, %v", got.Bytes, err)
	}
	if st := s.Stats(); st.Manifests != 1 || st.ManifestBytes != int64(len(m)) {
		t.Errorf("stats %+v", st)
	}
}
