package convert

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/internal/atomicfile"
)

// formatVersion names the conversion rules (mount options, normalisation,
// block comparison). Changing them changes the bytes a conversion gives, so
// it is part of every cache key.
const formatVersion = "obdtrace-convert/1"

// layerCache keeps converted layer blobs, keyed by what determines their
// bytes: the chain id of the source layers up to and including the layer,
// the filesystem they were built on (baselayer digest or mkfs parameters)
// and formatVersion. A cache entry is a directory holding the blob and its
// descriptor; entries appear atomically (renamed into place) and are never
// modified, so concurrent converters may share a cache.
type layerCache struct {
	dir string
}

const (
	cacheBlobFile = "blob"
	cacheDescFile = "descriptor.json"
)

func newLayerCache(dir string) (*layerCache, error) {
	if err := os.MkdirAll(filepath.Join(dir, "layers"), 0o755); err != nil {
		return nil, fmt.Errorf("convert: cache: %w", err)
	}
	return &layerCache{dir: dir}, nil
}

// key is the cache key of the layer whose source chain id is chainID,
// built on base (a description of the filesystem below the image).
func cacheKey(chainID digest.Digest, base string) string {
	h := sha256.Sum256([]byte(formatVersion + "\n" + base + "\n" + chainID.String()))
	return hex.EncodeToString(h[:])
}

func (c *layerCache) entry(key string) string { return filepath.Join(c.dir, "layers", key) }

// cachedBlob is a blob in the cache or the work directory.
type cachedBlob struct {
	Path string
	Desc ocispec.Descriptor
}

// get returns the entry for key, verifying the blob's size and digest (a
// damaged blob would corrupt every layer built on it). A missing or damaged
// entry reports ok false; a damaged one is removed.
func (c *layerCache) get(key string) (cachedBlob, bool, error) {
	dir := c.entry(key)
	data, err := os.ReadFile(filepath.Join(dir, cacheDescFile))
	if errors.Is(err, fs.ErrNotExist) {
		return cachedBlob{}, false, nil
	}
	if err != nil {
		return cachedBlob{}, false, fmt.Errorf("convert: cache: %w", err)
	}
	b := cachedBlob{Path: filepath.Join(dir, cacheBlobFile)}
	if err := json.Unmarshal(data, &b.Desc); err != nil || b.Desc.Digest.Validate() != nil {
		os.RemoveAll(dir)
		return cachedBlob{}, false, nil
	}
	if err := verifyFile(b.Path, b.Desc); err != nil {
		os.RemoveAll(dir)
		return cachedBlob{}, false, nil
	}
	return b, true, nil
}

// put moves the blob at path (in the same filesystem as the cache) into
// the entry for key.
func (c *layerCache) put(key, path string, desc ocispec.Descriptor) (cachedBlob, error) {
	dir := c.entry(key)
	tmp, err := os.MkdirTemp(filepath.Join(c.dir, "layers"), ".tmp-"+key[:12]+"-")
	if err != nil {
		return cachedBlob{}, fmt.Errorf("convert: cache: %w", err)
	}
	defer os.RemoveAll(tmp)
	if err := os.Rename(path, filepath.Join(tmp, cacheBlobFile)); err != nil {
		return cachedBlob{}, fmt.Errorf("convert: cache: %w", err)
	}
	data, err := json.Marshal(desc)
	if err != nil {
		return cachedBlob{}, fmt.Errorf("convert: cache: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(tmp, cacheDescFile), data, 0o644); err != nil {
		return cachedBlob{}, fmt.Errorf("convert: cache: %w", err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		// Another converter put the same entry first: its blob is
		// byte-identical, so use it.
		if b, ok, gerr := c.get(key); gerr == nil && ok {
			return b, nil
		}
		return cachedBlob{}, fmt.Errorf("convert: cache: %w", err)
	}
	return cachedBlob{Path: filepath.Join(dir, cacheBlobFile), Desc: desc}, nil
}

// verifyFile checks that the file at path is the blob desc describes.
func verifyFile(path string, desc ocispec.Descriptor) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	v := desc.Digest.Verifier()
	n, err := io.Copy(v, f)
	if err != nil {
		return err
	}
	if n != desc.Size || !v.Verified() {
		return fmt.Errorf("%w: %s is not blob %s (%d bytes)", ErrDigest, path, desc.Digest, desc.Size)
	}
	return nil
}
