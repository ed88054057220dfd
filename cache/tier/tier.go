// Package tier is the shared second level of slipway's store in a fleet:
// an S3-compatible object store (AWS S3, MinIO, Ceph RGW, GCS's S3 API)
// that every replica reads and writes, and the source of truth for what
// must outlive a replica. Each replica keeps its badger-indexed disk in
// front of it.
//
// The key layout, under Config.Prefix. Repository names may hold '/', but
// never ':', so ':' ends them; ns is an upstream host (it holds no '/').
//
//	blobs/<alg>/<hex>                               blob bytes, written create-only
//	manifests/<alg>/<hex>                           manifest bytes, created once; Content-Type its media type
//	repos/<repo>:repo                               a local (pushed) repository exists
//	repos/<repo>:tags/<tag>                         a pushed tag; body: the digest
//	repos/<repo>:links/<alg>/<hex>                  the pushed repository holds the digest
//	repos/<repo>:referrers/<alg>/<hex>/<alg>/<hex>  subject -> referrer; body: descriptor JSON
//	pulled/<ns>/<repo>:tags/<tag>                   a pulled tag; body: {"digest", "fetched_at"}
//	leases/<name>                                   a lease (fleet GC): {"holder", "until", ...}, conditional PUTs
//
// Blobs and manifests are content-addressed: a create-only PUT that finds
// the key taken (412) has found the same bytes, and counts as success.
package tier

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"
	"github.com/aws/smithy-go/middleware"
	"github.com/opencontainers/go-digest"
)

// Sentinel errors; every error a Client returns wraps one of them or a
// context error.
var (
	ErrNotFound     = errors.New("tier: not found")
	ErrUnavailable  = errors.New("tier: the object store is unavailable")
	ErrPrecondition = errors.New("tier: precondition failed")
	ErrBadObject    = errors.New("tier: an object cannot be read")
)

// Config says where the object store is.
type Config struct {
	Endpoint string // http(s)://host[:port]; empty: AWS S3 for Region
	Bucket   string
	Prefix   string // key prefix, e.g. "slipway/"
	Region   string // default us-east-1
	// AccessKey and SecretKey are static credentials.
	AccessKey, SecretKey string
	// Timeout bounds one request of a small object (not a blob body).
	// Default 10 s.
	Timeout time.Duration
	// HTTPClient, if set, sends the requests (tests, proxies).
	HTTPClient *http.Client
}

// Client reads and writes the shared tier. It is safe for concurrent use.
type Client struct {
	s3      *s3.Client
	bucket  string
	prefix  string
	timeout time.Duration
}

// New returns a client; it sends nothing until used.
func New(c Config) (*Client, error) {
	if c.Bucket == "" {
		return nil, errors.New("tier: no bucket")
	}
	if c.Region == "" {
		c.Region = "us-east-1"
	}
	if c.Timeout <= 0 {
		c.Timeout = 10 * time.Second
	}
	if c.HTTPClient == nil {
		c.HTTPClient = &http.Client{Transport: &http.Transport{
			Proxy:               http.ProxyFromEnvironment,
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConnsPerHost: 64,
			IdleConnTimeout:     90 * time.Second,
		}}
	}
	creds := aws.Credentials{AccessKeyID: c.AccessKey, SecretAccessKey: c.SecretKey}
	o := s3.Options{
		Region:     c.Region,
		HTTPClient: c.HTTPClient,
		Credentials: aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			return creds, nil
		}),
		// MinIO and RGW reject the default CRC32 trailers
		// (aws-sdk-go-v2#2960): checksums only where S3 requires them.
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
		// slipway verifies every blob by its digest: no second hash of
		// the body to sign it, on http too.
		APIOptions:       []func(*middleware.Stack) error{v4.SwapComputePayloadSHA256ForUnsignedPayloadMiddleware},
		RetryMaxAttempts: 2,
	}
	if c.Endpoint != "" {
		o.BaseEndpoint = aws.String(strings.TrimSuffix(c.Endpoint, "/"))
		o.UsePathStyle = true
	}
	return &Client{s3: s3.New(o), bucket: c.Bucket, prefix: c.Prefix, timeout: c.Timeout}, nil
}

// Info is what a HEAD tells of an object.
type Info struct {
	Size     int64
	Modified time.Time
	ETag     string
}

func digestKey(d digest.Digest) string { return string(d.Algorithm()) + "/" + d.Encoded() }

func (c *Client) keyBlob(d digest.Digest) string     { return c.prefix + "blobs/" + digestKey(d) }
func (c *Client) keyManifest(d digest.Digest) string { return c.prefix + "manifests/" + digestKey(d) }
func (c *Client) keyRepo(repo string) string         { return c.prefix + "repos/" + repo + ":repo" }
func (c *Client) keyTag(repo, tag string) string     { return c.prefix + "repos/" + repo + ":tags/" + tag }
func (c *Client) keyLink(repo string, d digest.Digest) string {
	return c.prefix + "repos/" + repo + ":links/" + digestKey(d)
}
func (c *Client) keyReferrer(repo string, subject, d digest.Digest) string {
	return c.keyReferrers(repo, subject) + digestKey(d)
}
func (c *Client) keyReferrers(repo string, subject digest.Digest) string {
	return c.prefix + "repos/" + repo + ":referrers/" + digestKey(subject) + "/"
}
func (c *Client) keyPulledTag(ns, repo, tag string) string {
	return c.prefix + "pulled/" + ns + "/" + repo + ":tags/" + tag
}
func (c *Client) keyLease(name string) string { return c.prefix + "leases/" + name }

// classify turns the SDK's errors into the sentinels.
func classify(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) {
		return err
	}
	var re *awshttp.ResponseError
	if errors.As(err, &re) && re.HTTPStatusCode() > 0 {
		switch re.HTTPStatusCode() {
		case http.StatusNotFound:
			return fmt.Errorf("%w: %v", ErrNotFound, err)
		case http.StatusPreconditionFailed, http.StatusConflict:
			return fmt.Errorf("%w: %v", ErrPrecondition, err)
		}
		if re.HTTPStatusCode() >= 500 || re.HTTPStatusCode() == http.StatusTooManyRequests {
			return fmt.Errorf("%w: %v", ErrUnavailable, err)
		}
		return fmt.Errorf("tier: %w", err)
	}
	var ae smithy.APIError
	if errors.As(err, &ae) && re == nil {
		switch ae.ErrorCode() {
		case "NoSuchKey", "NotFound":
			return fmt.Errorf("%w: %v", ErrNotFound, err)
		case "PreconditionFailed", "ConditionalRequestConflict":
			return fmt.Errorf("%w: %v", ErrPrecondition, err)
		}
		return fmt.Errorf("tier: %w", err)
	}
	// No answer: connection refused, reset, timeout.
	return fmt.Errorf("%w: %v", ErrUnavailable, err)
}

func (c *Client) small(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, c.timeout)
}

// put writes key. ifNoneMatch: only if absent; ifMatch: only if its ETag
// is that.
func (c *Client) put(ctx context.Context, key string, body io.ReadSeeker, size int64, contentType string, ifNoneMatch bool, ifMatch string) (string, error) {
	in := &s3.PutObjectInput{Bucket: &c.bucket, Key: &key, Body: body, ContentLength: aws.Int64(size)}
	if contentType != "" {
		in.ContentType = &contentType
	}
	if ifNoneMatch {
		in.IfNoneMatch = aws.String("*")
	}
	if ifMatch != "" {
		in.IfMatch = &ifMatch
	}
	out, err := c.s3.PutObject(ctx, in)
	if err != nil {
		return "", classify(err)
	}
	return aws.ToString(out.ETag), nil
}

func (c *Client) putSmall(ctx context.Context, key string, b []byte, contentType string) error {
	ctx, cancel := c.small(ctx)
	defer cancel()
	_, err := c.put(ctx, key, bytes.NewReader(b), int64(len(b)), contentType, false, "")
	return err
}

// createOnce writes key if it is absent; taken already counts as done.
// Keys written so are named by their content, so one there is the same
// bytes: a HEAD first spares sending them again. A store that finds the
// key taken while the body is still coming answers 412 and may close the
// connection under the writer (MinIO does), which reads as a reset write;
// a HEAD after a failed write tells that apart from an outage.
func (c *Client) createOnce(ctx context.Context, key string, body io.ReadSeeker, size int64, contentType string) error {
	if _, err := c.head(ctx, key); err == nil {
		return nil
	}
	_, err := c.put(ctx, key, body, size, contentType, true, "")
	if errors.Is(err, ErrPrecondition) {
		return nil
	}
	if errors.Is(err, ErrUnavailable) {
		if _, herr := c.head(ctx, key); herr == nil {
			return nil
		}
	}
	return err
}

func (c *Client) get(ctx context.Context, key string) (io.ReadCloser, int64, string, error) {
	out, err := c.s3.GetObject(ctx, &s3.GetObjectInput{Bucket: &c.bucket, Key: &key})
	if err != nil {
		return nil, 0, "", classify(err)
	}
	size := int64(-1)
	if out.ContentLength != nil {
		size = *out.ContentLength
	}
	return out.Body, size, aws.ToString(out.ContentType), nil
}

// maxSmall bounds what getSmall reads: manifests (4 MiB) and metadata.
const maxSmall = 4<<20 + 1

func (c *Client) getSmall(ctx context.Context, key string) ([]byte, string, error) {
	ctx, cancel := c.small(ctx)
	defer cancel()
	body, _, ct, err := c.get(ctx, key)
	if err != nil {
		return nil, "", err
	}
	defer body.Close()
	b, err := io.ReadAll(io.LimitReader(body, maxSmall))
	if err != nil {
		return nil, "", classify(err)
	}
	if len(b) >= maxSmall {
		return nil, "", fmt.Errorf("%w: %s is too big", ErrBadObject, key)
	}
	return b, ct, nil
}

func (c *Client) head(ctx context.Context, key string) (Info, error) {
	ctx, cancel := c.small(ctx)
	defer cancel()
	out, err := c.s3.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &c.bucket, Key: &key})
	if err != nil {
		return Info{}, classify(err)
	}
	return Info{Size: aws.ToInt64(out.ContentLength), Modified: aws.ToTime(out.LastModified), ETag: aws.ToString(out.ETag)}, nil
}

func (c *Client) exists(ctx context.Context, key string) (bool, error) {
	_, err := c.head(ctx, key)
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

func (c *Client) delete(ctx context.Context, key string) error {
	ctx, cancel := c.small(ctx)
	defer cancel()
	_, err := c.s3.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: &c.bucket, Key: &key})
	if err = classify(err); errors.Is(err, ErrNotFound) {
		return nil
	}
	return err
}

// list calls fn for every key under prefix (the part after it) with its
// info, in key order, page by page.
func (c *Client) list(ctx context.Context, prefix string, fn func(rest string, info Info) error) error {
	in := &s3.ListObjectsV2Input{Bucket: &c.bucket, Prefix: &prefix}
	p := s3.NewListObjectsV2Paginator(c.s3, in)
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return classify(err)
		}
		for _, o := range page.Contents {
			info := Info{Size: aws.ToInt64(o.Size), Modified: aws.ToTime(o.LastModified), ETag: aws.ToString(o.ETag)}
			if err := fn(strings.TrimPrefix(aws.ToString(o.Key), prefix), info); err != nil {
				return err
			}
		}
	}
	return nil
}

// Ping reports whether the bucket answers.
func (c *Client) Ping(ctx context.Context) error {
	ctx, cancel := c.small(ctx)
	defer cancel()
	_, err := c.s3.HeadBucket(ctx, &s3.HeadBucketInput{Bucket: &c.bucket})
	return classify(err)
}

// PutBlob writes blob d from f (size bytes), create-only: a blob already
// there is done.
func (c *Client) PutBlob(ctx context.Context, d digest.Digest, f io.ReadSeeker, size int64) error {
	return c.createOnce(ctx, c.keyBlob(d), f, size, "application/octet-stream")
}

// Blob opens blob d for reading; size is its length.
func (c *Client) Blob(ctx context.Context, d digest.Digest) (io.ReadCloser, int64, error) {
	body, size, _, err := c.get(ctx, c.keyBlob(d))
	return body, size, err
}

// TouchBlob renews blob d's modification time (a copy onto itself), so
// that a GC grace counted from it starts again: a push of a blob that was
// already there is a use.
func (c *Client) TouchBlob(ctx context.Context, d digest.Digest) error {
	ctx, cancel := c.small(ctx)
	defer cancel()
	key := c.keyBlob(d)
	_, err := c.s3.CopyObject(ctx, &s3.CopyObjectInput{Bucket: &c.bucket, Key: &key,
		CopySource: aws.String(c.bucket + "/" + key), MetadataDirective: types.MetadataDirectiveReplace,
		Metadata: map[string]string{"touched": time.Now().UTC().Format(time.RFC3339)}})
	return classify(err)
}

// StatBlob says whether blob d is there, and its size.
func (c *Client) StatBlob(ctx context.Context, d digest.Digest) (Info, error) {
	return c.head(ctx, c.keyBlob(d))
}

// PutManifest writes manifest d (create-only).
func (c *Client) PutManifest(ctx context.Context, d digest.Digest, mediaType string, b []byte) error {
	ctx, cancel := c.small(ctx)
	defer cancel()
	return c.createOnce(ctx, c.keyManifest(d), bytes.NewReader(b), int64(len(b)), mediaType)
}

// Manifest reads manifest d and its media type.
func (c *Client) Manifest(ctx context.Context, d digest.Digest) ([]byte, string, error) {
	return c.getSmall(ctx, c.keyManifest(d))
}

// AddRepository records that local repository repo exists.
func (c *Client) AddRepository(ctx context.Context, repo string) error {
	ctx, cancel := c.small(ctx)
	defer cancel()
	return c.createOnce(ctx, c.keyRepo(repo), bytes.NewReader(nil), 0, "")
}

// RepositoryExists reports whether local repository repo exists.
func (c *Client) RepositoryExists(ctx context.Context, repo string) (bool, error) {
	return c.exists(ctx, c.keyRepo(repo))
}

// Repositories lists the local repositories, in lexical order.
func (c *Client) Repositories(ctx context.Context) ([]string, error) {
	var out []string
	err := c.list(ctx, c.prefix+"repos/", func(rest string, _ Info) error {
		if repo, ok := strings.CutSuffix(rest, ":repo"); ok {
			out = append(out, repo)
		}
		return nil
	})
	slices.Sort(out) // keys sort "a/b:..." before "a:..."
	return out, err
}

// Link records that local repository repo holds d.
func (c *Client) Link(ctx context.Context, repo string, d digest.Digest) error {
	return c.putSmall(ctx, c.keyLink(repo, d), nil, "")
}

// Linked reports whether local repository repo holds d.
func (c *Client) Linked(ctx context.Context, repo string, d digest.Digest) (bool, error) {
	return c.exists(ctx, c.keyLink(repo, d))
}

// Unlink takes d out of repo; a missing link is not an error.
func (c *Client) Unlink(ctx context.Context, repo string, d digest.Digest) error {
	return c.delete(ctx, c.keyLink(repo, d))
}

// SetTag points repo:tag at d.
func (c *Client) SetTag(ctx context.Context, repo, tag string, d digest.Digest) error {
	return c.putSmall(ctx, c.keyTag(repo, tag), []byte(d), "text/plain")
}

// Tag returns what repo:tag points at, or ErrNotFound.
func (c *Client) Tag(ctx context.Context, repo, tag string) (digest.Digest, error) {
	b, _, err := c.getSmall(ctx, c.keyTag(repo, tag))
	if err != nil {
		return "", err
	}
	d := digest.Digest(b)
	if d.Validate() != nil {
		return "", fmt.Errorf("%w: tag %s:%s", ErrBadObject, repo, tag)
	}
	return d, nil
}

// DeleteTag removes repo:tag; a missing tag is not an error.
func (c *Client) DeleteTag(ctx context.Context, repo, tag string) error {
	return c.delete(ctx, c.keyTag(repo, tag))
}

// Tags lists repo's tags in lexical order.
func (c *Client) Tags(ctx context.Context, repo string) ([]string, error) {
	var out []string
	err := c.list(ctx, c.prefix+"repos/"+repo+":tags/", func(rest string, _ Info) error {
		out = append(out, rest)
		return nil
	})
	return out, err
}

// PutReferrer records that d, described by desc (JSON), refers to subject
// in repo.
func (c *Client) PutReferrer(ctx context.Context, repo string, subject, d digest.Digest, desc []byte) error {
	return c.putSmall(ctx, c.keyReferrer(repo, subject, d), desc, "application/json")
}

// DeleteReferrer removes what PutReferrer recorded.
func (c *Client) DeleteReferrer(ctx context.Context, repo string, subject, d digest.Digest) error {
	return c.delete(ctx, c.keyReferrer(repo, subject, d))
}

// Referrers returns the descriptors recorded for subject in repo.
func (c *Client) Referrers(ctx context.Context, repo string, subject digest.Digest) ([][]byte, error) {
	var keys []string
	prefix := c.keyReferrers(repo, subject)
	if err := c.list(ctx, prefix, func(rest string, _ Info) error {
		keys = append(keys, prefix+rest)
		return nil
	}); err != nil {
		return nil, err
	}
	var out [][]byte
	for _, k := range keys {
		b, _, err := c.getSmall(ctx, k)
		if errors.Is(err, ErrNotFound) {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, err
		}
		out = append(out, b)
	}
	return out, nil
}

// PulledTag is a tag of a proxied repository as a replica fetched it.
type PulledTag struct {
	Digest    digest.Digest `json:"digest"`
	FetchedAt time.Time     `json:"fetched_at"`
}

// SetPulledTag records ns/repo:tag.
func (c *Client) SetPulledTag(ctx context.Context, ns, repo, tag string, t PulledTag) error {
	b, err := json.Marshal(t)
	if err != nil {
		return err
	}
	return c.putSmall(ctx, c.keyPulledTag(ns, repo, tag), b, "application/json")
}

// GetPulledTag returns ns/repo:tag, or ErrNotFound.
func (c *Client) GetPulledTag(ctx context.Context, ns, repo, tag string) (PulledTag, error) {
	b, _, err := c.getSmall(ctx, c.keyPulledTag(ns, repo, tag))
	if err != nil {
		return PulledTag{}, err
	}
	var t PulledTag
	if err := json.Unmarshal(b, &t); err != nil || t.Digest.Validate() != nil {
		return PulledTag{}, fmt.Errorf("%w: pulled tag %s/%s:%s", ErrBadObject, ns, repo, tag)
	}
	return t, nil
}
