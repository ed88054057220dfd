package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"slipway/cache/tier"
	"slipway/upstream"
)

// fleetConfig is serve's flags for running as one replica of a fleet: the
// shared S3 tier, and the peers.
type fleetConfig struct {
	s3Endpoint, s3Bucket, s3Prefix, s3Region, s3Credentials   string
	peers, peersDNS, peerListen, peerAdvertise, peerTokenFile string
}

func (f *fleetConfig) register(fs *flag.FlagSet) {
	f.registerS3(fs)
	f.registerPeers(fs)
}

// registerS3 declares the shared tier's flags (serve and gc have them).
func (f *fleetConfig) registerS3(fs *flag.FlagSet) {
	fs.StringVar(&f.s3Endpoint, "s3-endpoint", "", "the shared tier: an S3-compatible endpoint, http(s)://host[:port] (MinIO, Ceph RGW); empty with --s3-bucket: AWS S3")
	fs.StringVar(&f.s3Bucket, "s3-bucket", "", "the shared tier's bucket; set: run as a replica of a fleet on this bucket")
	fs.StringVar(&f.s3Prefix, "s3-prefix", "", "key prefix in the bucket (e.g. slipway/)")
	fs.StringVar(&f.s3Region, "s3-region", "us-east-1", "the bucket's region")
	fs.StringVar(&f.s3Credentials, "s3-credentials-file", "", "a file with aws_access_key_id and aws_secret_access_key (the AWS credentials file format); default: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
}

func (f *fleetConfig) registerPeers(fs *flag.FlagSet) {
	fs.StringVar(&f.peers, "peers", "", "comma-separated peer addresses (host:port of each replica's --peer-listen)")
	fs.StringVar(&f.peersDNS, "peers-dns", "", "a DNS name whose addresses are the replicas (a Kubernetes headless Service), re-resolved every 10 s")
	fs.StringVar(&f.peerListen, "peer-listen", "", "address of the replica-to-replica listener (never for clients)")
	fs.StringVar(&f.peerAdvertise, "peer-advertise", "", "this replica's peer address as the others reach it; default: --peer-listen's, or this host's first address with its port")
	fs.StringVar(&f.peerTokenFile, "peer-token-file", "", "a file holding the token every replica shares; default: SLIPWAY_PEER_TOKEN")
}

// enabled reports whether a shared tier is configured.
func (f *fleetConfig) enabled() bool { return f.s3Bucket != "" }

// tierClient makes the shared tier's client.
func (f *fleetConfig) tierClient() (*tier.Client, error) {
	key, secret := os.Getenv("AWS_ACCESS_KEY_ID"), os.Getenv("AWS_SECRET_ACCESS_KEY")
	if f.s3Credentials != "" {
		var err error
		if key, secret, err = readAWSCredentials(f.s3Credentials); err != nil {
			return nil, err
		}
	}
	if key == "" || secret == "" {
		return nil, errors.New("--s3-bucket: no credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or --s3-credentials-file)")
	}
	return tier.New(tier.Config{Endpoint: f.s3Endpoint, Bucket: f.s3Bucket, Prefix: f.s3Prefix, Region: f.s3Region,
		AccessKey: key, SecretKey: secret})
}

// readAWSCredentials reads the keys of an AWS credentials file (its
// default section, or the first one).
func readAWSCredentials(path string) (key, secret string, err error) {
	file, err := os.Open(path)
	if err != nil {
		return "", "", fmt.Errorf("--s3-credentials-file: %w", err)
	}
	defer file.Close()
	sc := bufio.NewScanner(file)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "aws_access_key_id":
			if key == "" {
				key = strings.TrimSpace(v)
			}
		case "aws_secret_access_key":
			if secret == "" {
				secret = strings.TrimSpace(v)
			}
		}
	}
	if key == "" || secret == "" {
		return "", "", fmt.Errorf("--s3-credentials-file %s: want aws_access_key_id and aws_secret_access_key", path)
	}
	return key, secret, sc.Err()
}

// newFleet makes the replica's fleet, if peers are configured (nil if
// not: a replica alone on the shared tier).
func (f *fleetConfig) newFleet(log *slog.Logger) (*upstream.Fleet, error) {
	if f.peers == "" && f.peersDNS == "" {
		if f.peerListen != "" {
			return nil, errors.New("--peer-listen needs --peers or --peers-dns")
		}
		return nil, nil
	}
	if !f.enabled() {
		return nil, errors.New("--peers and --peers-dns need the shared tier (--s3-bucket)")
	}
	if f.peerListen == "" {
		return nil, errors.New("--peers and --peers-dns need --peer-listen")
	}
	token := os.Getenv("SLIPWAY_PEER_TOKEN")
	if f.peerTokenFile != "" {
		b, err := os.ReadFile(f.peerTokenFile)
		if err != nil {
			return nil, fmt.Errorf("--peer-token-file: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	if len(token) < 16 {
		return nil, errors.New("the peer token (--peer-token-file or SLIPWAY_PEER_TOKEN) must have at least 16 characters")
	}
	self, err := f.advertise()
	if err != nil {
		return nil, err
	}
	return upstream.NewFleet(upstream.FleetConfig{Self: self, Peers: splitList(f.peers), DNS: f.peersDNS,
		Token: token, Logger: log})
}

// advertise is this replica's peer address as the others reach it.
func (f *fleetConfig) advertise() (string, error) {
	if f.peerAdvertise != "" {
		return f.peerAdvertise, nil
	}
	host, port, err := net.SplitHostPort(f.peerListen)
	if err != nil {
		return "", fmt.Errorf("--peer-listen: %w", err)
	}
	if ip := net.ParseIP(host); host != "" && (ip == nil || !ip.IsUnspecified()) {
		return f.peerListen, nil
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return "", err
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && !n.IP.IsLoopback() && n.IP.To4() != nil {
			return net.JoinHostPort(n.IP.String(), port), nil
		}
	}
	return "", errors.New("no address to advertise to the peers: set --peer-advertise")
}

// servePeers starts the peer listener.
func servePeers(addr string, h http.Handler, log *slog.Logger, errc chan<- error) (*http.Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--peer-listen: %w", err)
	}
	ps := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	go func() { errc <- ps.Serve(ln) }()
	log.Info("peers serving", "addr", ln.Addr().String())
	return ps, nil
}
