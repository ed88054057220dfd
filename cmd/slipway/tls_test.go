package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/crane"
)

// testCert writes a self-signed certificate for 127.0.0.1 and its key, and
// returns their paths and a pool that trusts the certificate.
func testCert(t *testing.T) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	certFile, keyFile, cert := testCertSerial(t, 1)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

// testCertSerial is testCert with the certificate's serial number, to
// tell one certificate from another.
func testCertSerial(t *testing.T, serial int64) (certFile, keyFile string, cert *x509.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial),
		Subject:               pkix.Name{CommonName: "slipway test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ = x509.ParseCertificate(der)
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	return certFile, keyFile, cert
}

// --tls-cert/--tls-key: crane pulls over HTTPS trusting the test
// certificate, and the server speaks HTTP/2.
func TestTLSPullWithCrane(t *testing.T) {
	t.Parallel()
	up := newUpstream(t)
	want := up.push(t, "team/app:v1", 64<<10, 2)
	certFile, keyFile, pool := testCert(t)
	addr := freeAddr(t)
	p := start(t, nil, "serve", "--listen", addr, "--upstream", up.url, "--data-dir", t.TempDir(),
		"--tls-cert", certFile, "--tls-key", keyFile)

	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}
	client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	var resp *http.Response
	var err error
	for i := 0; i < 200; i++ {
		if resp, err = client.Get("https://" + addr + "/v2/"); err == nil {
			break
		}
		select {
		case <-p.done:
			t.Fatalf("slipway exited: %v", p.err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if err != nil {
		t.Fatalf("GET https://%s/v2/: %v", addr, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.ProtoMajor != 2 {
		t.Errorf("GET /v2/ over TLS: %s %s, want 200 over HTTP/2", resp.Proto, resp.Status)
	}

	img, err := crane.Pull(addr+"/team/app:v1", crane.WithTransport(tr))
	if err != nil {
		t.Fatalf("crane pull over TLS: %v", err)
	}
	if d, _ := img.Digest(); d.String() != want {
		t.Errorf("digest %s, want %s", d, want)
	}
	layers, _ := img.Layers()
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		_, err = io.Copy(io.Discard, rc)
		rc.Close()
		if err != nil {
			t.Fatalf("read layer over TLS: %v", err)
		}
	}
	// Without trusting the certificate, the client refuses it.
	if _, err := crane.Pull(addr + "/team/app:v1"); err == nil {
		t.Error("a client that does not trust the test certificate pulled anyway")
	}
	p.stop(t, syscall.SIGTERM, 10*time.Second)
}
