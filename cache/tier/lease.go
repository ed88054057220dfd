package tier

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/opencontainers/go-digest"
)

// Lease is a lease object: one holder at a time, until Until. Sweeping
// says a GC pass holding it is removing content now (manifest PUTs wait
// for it to end before they answer; see cache's shared GC).
type Lease struct {
	Holder   string    `json:"holder"`
	Until    time.Time `json:"until"`
	Sweeping bool      `json:"sweeping,omitempty"`
	etag     string
}

// Held reports whether l is held by someone at now.
func (l Lease) Held(now time.Time) bool { return l.Holder != "" && now.Before(l.Until) }

// ReadLease returns lease name as it is (a zero Lease if there is none).
func (c *Client) ReadLease(ctx context.Context, name string) (Lease, error) {
	ctx, cancel := c.small(ctx)
	defer cancel()
	out, err := c.s3.GetObject(ctx, &s3.GetObjectInput{Bucket: &c.bucket, Key: aws.String(c.keyLease(name))})
	if err = classify(err); errors.Is(err, ErrNotFound) {
		return Lease{}, nil
	}
	if err != nil {
		return Lease{}, err
	}
	defer out.Body.Close()
	b, err := io.ReadAll(io.LimitReader(out.Body, 64<<10))
	if err != nil {
		return Lease{}, classify(err)
	}
	var l Lease
	if err := json.Unmarshal(b, &l); err != nil {
		return Lease{}, fmt.Errorf("%w: lease %s: %v", ErrBadObject, name, err)
	}
	l.etag = aws.ToString(out.ETag)
	return l, nil
}

// AcquireLease makes holder the holder of lease name until now+ttl, if
// nobody else holds it: the object is created (If-None-Match: *), or
// replaced where it expired or is holder's already (If-Match: its ETag).
// Of any number of replicas that race, at most one wins. It returns the
// lease held (for UpdateLease) and whether holder holds it.
func (c *Client) AcquireLease(ctx context.Context, name, holder string, ttl time.Duration, now time.Time) (Lease, bool, error) {
	cur, err := c.ReadLease(ctx, name)
	if err != nil {
		return Lease{}, false, err
	}
	if cur.Held(now) && cur.Holder != holder {
		return cur, false, nil
	}
	next := Lease{Holder: holder, Until: now.Add(ttl)}
	l, err := c.writeLease(ctx, name, next, cur.etag)
	if errors.Is(err, ErrPrecondition) {
		return Lease{}, false, nil // another got there first
	}
	return l, err == nil, err
}

// UpdateLease writes l (held by its holder) again, if nobody replaced it
// since it was read (else ErrPrecondition: the lease was lost).
func (c *Client) UpdateLease(ctx context.Context, name string, l Lease) (Lease, error) {
	if l.etag == "" {
		return Lease{}, fmt.Errorf("%w: lease %s was never read", ErrPrecondition, name)
	}
	return c.writeLease(ctx, name, l, l.etag)
}

// ReleaseLease ends l, if it is still the lease.
func (c *Client) ReleaseLease(ctx context.Context, name string, l Lease) error {
	l.Until, l.Sweeping = time.Time{}, false
	_, err := c.UpdateLease(ctx, name, l)
	return err
}

// writeLease writes l: create-only when etag is empty, else only over
// that ETag.
func (c *Client) writeLease(ctx context.Context, name string, l Lease, etag string) (Lease, error) {
	b, err := json.Marshal(l)
	if err != nil {
		return Lease{}, err
	}
	ctx, cancel := c.small(ctx)
	defer cancel()
	l.etag, err = c.put(ctx, c.keyLease(name), bytes.NewReader(b), int64(len(b)), "application/json", etag == "", etag)
	return l, err
}

// Object is one blob or manifest of the tier, as GC lists them.
type Object struct {
	Digest   digest.Digest
	Size     int64
	Modified time.Time
}

// Blobs lists every blob.
func (c *Client) Blobs(ctx context.Context, fn func(Object) error) error {
	return c.listDigests(ctx, c.prefix+"blobs/", fn)
}

// Manifests lists every manifest.
func (c *Client) Manifests(ctx context.Context, fn func(Object) error) error {
	return c.listDigests(ctx, c.prefix+"manifests/", fn)
}

func (c *Client) listDigests(ctx context.Context, prefix string, fn func(Object) error) error {
	return c.list(ctx, prefix, func(rest string, info Info) error {
		alg, hex, ok := strings.Cut(rest, "/")
		d := digest.NewDigestFromEncoded(digest.Algorithm(alg), hex)
		if !ok || d.Validate() != nil {
			return nil // not ours
		}
		return fn(Object{Digest: d, Size: info.Size, Modified: info.Modified})
	})
}

// DeleteBlob removes blob d.
func (c *Client) DeleteBlob(ctx context.Context, d digest.Digest) error {
	return c.delete(ctx, c.keyBlob(d))
}

// DeleteManifest removes manifest d.
func (c *Client) DeleteManifest(ctx context.Context, d digest.Digest) error {
	return c.delete(ctx, c.keyManifest(d))
}

// Roots lists what keeps manifests in the tier: every pushed repository's
// tags and links, and every pulled tag, by the digest it names.
func (c *Client) Roots(ctx context.Context, fn func(d digest.Digest) error) error {
	err := c.list(ctx, c.prefix+"repos/", func(rest string, _ Info) error {
		switch {
		case strings.Contains(rest, ":links/"):
			_, dk, _ := strings.Cut(rest, ":links/")
			alg, hex, _ := strings.Cut(dk, "/")
			if d := digest.NewDigestFromEncoded(digest.Algorithm(alg), hex); d.Validate() == nil {
				return fn(d)
			}
		case strings.Contains(rest, ":tags/"):
			repo, tag, _ := strings.Cut(rest, ":tags/")
			d, err := c.Tag(ctx, repo, tag)
			if errors.Is(err, ErrNotFound) || errors.Is(err, ErrBadObject) {
				return nil
			}
			if err != nil {
				return err
			}
			return fn(d)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return c.list(ctx, c.prefix+"pulled/", func(rest string, _ Info) error {
		b, _, err := c.getSmall(ctx, c.prefix+"pulled/"+rest)
		if errors.Is(err, ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		var t PulledTag
		if json.Unmarshal(b, &t) == nil && t.Digest.Validate() == nil {
			return fn(t.Digest)
		}
		return nil
	})
}

// CreateBucket creates the bucket if it does not exist.
func (c *Client) CreateBucket(ctx context.Context) error {
	ctx, cancel := c.small(ctx)
	defer cancel()
	_, err := c.s3.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: &c.bucket})
	var owned interface{ ErrorCode() string }
	if errors.As(err, &owned) && (owned.ErrorCode() == "BucketAlreadyOwnedByYou" || owned.ErrorCode() == "BucketAlreadyExists") {
		return nil
	}
	return classify(err)
}
