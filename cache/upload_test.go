package cache

import (
	"bytes"
	"crypto/sha256"
	"encoding"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// rebootTo makes the store see another boot of the machine until the test
// ends.
func rebootTo(t *testing.T, id string) {
	t.Helper()
	was := bootID
	bootID = func() string { return id }
	t.Cleanup(func() { bootID = was })
}

// Chunks are not fsynced, so an upload written before the machine went
// down is checked against its hash state before it goes on: whole, it
// finishes; with chunks the page cache never wrote, it is ended (the
// client is told the upload is unknown and pushes again), and no wrong
// blob is ever stored.
func TestUploadChunksAfterAReboot(t *testing.T) {
	if bootID() == "" {
		t.Skip("no boot id on this system: every chunk is fsynced")
	}
	b := testBytes(3<<20, 7)
	d := digest.FromBytes(b)
	half := int64(len(b) / 2)
	for _, tc := range []struct {
		name   string
		damage func(path string) error
		goesOn bool
	}{
		{"intact", func(string) error { return nil }, true},
		{"short", func(p string) error { return os.Truncate(p, half-4096) }, false},
		{"zeroed", func(p string) error {
			f, err := os.OpenFile(p, os.O_WRONLY, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = f.WriteAt(make([]byte, 4096), half-8192)
			return err
		}, false},
		{"gone", os.Remove, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rebootTo(t, "boot-one-0123456")
			s, dir := newStore(t)
			u, err := s.CreateUpload("app", time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := s.AppendUpload(u.ID, 0, bytes.NewReader(b[:half]), half, time.Hour); err != nil {
				t.Fatal(err)
			}
			st, err := s.getUpload(u.ID)
			if err != nil || st.boot != "boot-one-0123456" {
				t.Fatalf("state after an unsynced chunk: boot %q, %v", st.boot, err)
			}
			// Same boot (a process restart): trusted as it is.
			if got, err := s.GetUpload(u.ID); err != nil || got.Size != half {
				t.Fatalf("same boot: %+v, %v", got, err)
			}
			if err := tc.damage(filepath.Join(dir, "tmp", st.temp)); err != nil {
				t.Fatal(err)
			}
			rebootTo(t, "boot-two-0123456")
			got, err := s.GetUpload(u.ID)
			if !tc.goesOn {
				if !errors.Is(err, ErrNotFound) {
					t.Fatalf("damaged upload after a reboot: %+v, %v; want ErrNotFound", got, err)
				}
				if _, err := s.FinishUpload(u.ID, half, bytes.NewReader(b[half:]), int64(len(b))-half, d, OriginPushed, time.Hour); !errors.Is(err, ErrNotFound) {
					t.Fatalf("finishing a damaged upload: %v; want ErrNotFound", err)
				}
				assertNotStored(t, s, dir, d)
				if _, err := os.Stat(filepath.Join(dir, "tmp", st.temp)); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("the damaged upload's file stays: %v", err)
				}
				return
			}
			if err != nil || got.Size != half {
				t.Fatalf("intact upload after a reboot: %+v, %v", got, err)
			}
			info, err := s.FinishUpload(u.ID, half, bytes.NewReader(b[half:]), int64(len(b))-half, d, OriginPushed, time.Hour)
			if err != nil || info.Size != int64(len(b)) {
				t.Fatalf("finish: %+v, %v", info, err)
			}
			checkStored(t, s, d, b, OriginPushed)
		})
	}
}

// An upload stored by a slipway that wrote no boot id (every chunk was
// fsynced) decodes and goes on.
func TestUploadStateWithoutABootIDDecodes(t *testing.T) {
	u := uploadState{Upload: Upload{ID: "x", Repo: "app", Size: 5, StartedAt: time.Unix(0, 42)}, temp: "upload-1"}
	var err error
	if u.hash, err = sha256.New().(encoding.BinaryMarshaler).MarshalBinary(); err != nil || len(u.hash) != sha256StateLen {
		t.Fatalf("sha256 state of %d bytes, %v", len(u.hash), err)
	}
	for _, boot := range []string{"", "0123456789abcdef"} {
		u.boot = boot
		v, err := encodeUpload(u)
		if err != nil {
			t.Fatal(err)
		}
		got, err := decodeUpload("x", v)
		if err != nil || got.boot != boot || !bytes.Equal(got.hash, u.hash) || got.temp != u.temp || got.Size != 5 {
			t.Fatalf("boot %q: decoded %+v, %v", boot, got, err)
		}
	}
	u.boot = "short"
	if _, err := encodeUpload(u); err == nil {
		t.Error("a boot id of the wrong length was encoded")
	}
}
