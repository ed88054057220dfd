package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"

	"github.com/opencontainers/go-digest"
)

// The ceiling: the least a registry can do for the warm scenarios. At
// start it copies the warm image from the upstream (the manifest into
// memory, the blobs into files); then it answers the manifest from memory
// and each blob with http.ServeFile, which uses sendfile.
type ceiling struct {
	manifest, mediaType, digest string
	dir                         string
}

func ceilingCommand(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("slipbench ceiling", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:5000", "address to listen on")
	upstream := fs.String("upstream", "", "upstream URL to copy the warm image from")
	dir := fs.String("dir", "", "directory for the blob files")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *upstream == "" || *dir == "" {
		return errors.New("ceiling: --upstream and --dir are required")
	}
	c := &ceiling{dir: *dir}
	if err := c.copyWarmImage(*upstream); err != nil {
		return err
	}
	return http.ListenAndServe(*listen, c)
}

func (c *ceiling) copyWarmImage(upstream string) error {
	req, _ := http.NewRequest(http.MethodGet, upstream+"/v2/"+repoWarm+"/manifests/"+tagWarm, nil)
	req.Header = manifestAccept.Clone()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		return fmt.Errorf("manifest from upstream: status %d: %v", resp.StatusCode, err)
	}
	c.manifest, c.mediaType, c.digest = string(body), resp.Header.Get("Content-Type"), string(digest.FromBytes(body))
	var m struct {
		Config struct{ Digest digest.Digest }
		Layers []struct{ Digest digest.Digest }
	}
	if err := json.Unmarshal(body, &m); err != nil {
		return err
	}
	if err := os.MkdirAll(c.dir, 0o755); err != nil {
		return err
	}
	for _, d := range append([]digest.Digest{m.Config.Digest}, m.Layers[0].Digest) {
		if err := d.Validate(); err != nil {
			return err
		}
		if err := copyBlob(upstream+"/v2/"+repoWarm+"/blobs/"+string(d), filepath.Join(c.dir, d.Encoded())); err != nil {
			return err
		}
	}
	return nil
}

func copyBlob(url, path string) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: status %d", url, resp.StatusCode)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func (c *ceiling) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Path
	switch {
	case p == "/v2/" || p == "/v2":
		w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	case strings.Contains(p, "/manifests/"):
		w.Header().Set("Content-Type", c.mediaType)
		w.Header().Set("Docker-Content-Digest", c.digest)
		w.Header().Set("Content-Length", fmt.Sprint(len(c.manifest)))
		io.WriteString(w, c.manifest)
	case strings.Contains(p, "/blobs/sha256:"):
		hex := p[strings.LastIndex(p, ":")+1:]
		if digest.NewDigestFromEncoded(digest.SHA256, hex).Validate() != nil {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		http.ServeFile(w, r, filepath.Join(c.dir, hex))
	default:
		http.NotFound(w, r)
	}
}
