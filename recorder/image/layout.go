package image

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"unicode"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/internal/atomicfile"
	"github.com/obdtrace/obdtrace/internal/iox"
)

// MaxIndexSize bounds the index.json of a layout.
const MaxIndexSize = 16 << 20

// Layout is an OCI image layout directory used as a Store: refs are the
// org.opencontainers.image.ref.name annotations of index.json's entries, or digests. Every
// file is replaced atomically (temporary file, fsync, rename), so a reader never sees a
// partial blob or index. A Layout is safe for concurrent use; two processes updating the same
// index.json at once may lose one update.
type Layout struct {
	dir string
	mu  sync.Mutex // serialises index.json updates
}

// OpenLayout opens the OCI image layout at dir, which must hold an oci-layout file of
// version 1.0.0.
func OpenLayout(dir string) (*Layout, error) {
	data, err := readFileLimited(filepath.Join(dir, ocispec.ImageLayoutFile), 4096)
	if err != nil {
		return nil, fmt.Errorf("image: open layout: %w", err)
	}
	var l ocispec.ImageLayout
	if err := json.Unmarshal(data, &l); err != nil || l.Version != ocispec.ImageLayoutVersion {
		return nil, fmt.Errorf("%w: %s: imageLayoutVersion %q, want %q (%v)",
			ErrUnsupported, ocispec.ImageLayoutFile, l.Version, ocispec.ImageLayoutVersion, err)
	}
	return &Layout{dir: dir}, nil
}

// Index is a parsed index.json. Entries keep their JSON so that unknown fields survive.
type Index struct {
	Manifests []ocispec.Descriptor

	fields map[string]json.RawMessage
	raw    []json.RawMessage
}

// ParseIndex parses and checks an OCI image index (index.json).
func ParseIndex(data []byte) (*Index, error) {
	if len(data) > MaxIndexSize {
		return nil, fmt.Errorf("%w: index of %d bytes, at most %d", ErrTooLarge, len(data), MaxIndexSize)
	}
	x := &Index{}
	if err := json.Unmarshal(data, &x.fields); err != nil || x.fields == nil {
		return nil, fmt.Errorf("%w: index is not a JSON object: %v", ErrInvalid, err)
	}
	var v int
	if err := json.Unmarshal(x.fields["schemaVersion"], &v); err != nil || v != 2 {
		return nil, fmt.Errorf("%w: index schemaVersion %s, want 2", ErrInvalid, x.fields["schemaVersion"])
	}
	if raw, ok := x.fields["manifests"]; ok {
		if err := json.Unmarshal(raw, &x.raw); err != nil {
			return nil, fmt.Errorf("%w: index manifests: %v", ErrInvalid, err)
		}
	}
	x.Manifests = make([]ocispec.Descriptor, len(x.raw))
	for i, raw := range x.raw {
		d := &x.Manifests[i]
		if err := json.Unmarshal(raw, d); err != nil {
			return nil, fmt.Errorf("%w: index entry %d: %v", ErrInvalid, i, err)
		}
		if err := d.Digest.Validate(); err != nil {
			return nil, fmt.Errorf("%w: index entry %d: digest %q: %v", ErrInvalid, i, d.Digest, err)
		}
		if d.Size < 0 {
			return nil, fmt.Errorf("%w: index entry %d: size %d", ErrInvalid, i, d.Size)
		}
	}
	return x, nil
}

// Find returns the index of the last entry named ref, or -1.
func (x *Index) Find(ref string) int {
	for i := len(x.Manifests) - 1; i >= 0; i-- {
		if x.Manifests[i].Annotations[ocispec.AnnotationRefName] == ref {
			return i
		}
	}
	return -1
}

// Tag points ref at desc: entries already named ref are dropped and desc is appended with
// ref as its ref name.
func (x *Index) Tag(ref string, desc ocispec.Descriptor) error {
	for i := x.Find(ref); i >= 0; i = x.Find(ref) {
		x.Manifests = slices.Delete(x.Manifests, i, i+1)
		x.raw = slices.Delete(x.raw, i, i+1)
	}
	desc.Annotations = maps.Clone(desc.Annotations)
	if desc.Annotations == nil {
		desc.Annotations = map[string]string{}
	}
	desc.Annotations[ocispec.AnnotationRefName] = ref
	raw, err := marshalJSON(desc)
	if err != nil {
		return err
	}
	x.Manifests = append(x.Manifests, desc)
	x.raw = append(x.raw, raw)
	return nil
}

// Marshal encodes the index, keeping fields it does not know.
func (x *Index) Marshal() ([]byte, error) {
	var err error
	if x.fields["manifests"], err = marshalJSON(x.raw); err != nil {
		return nil, err
	}
	return marshalJSON(x.fields)
}

func (l *Layout) readIndex() (*Index, error) {
	data, err := readFileLimited(filepath.Join(l.dir, ocispec.ImageIndexFile), MaxIndexSize)
	if err != nil {
		return nil, fmt.Errorf("image: layout index: %w", err)
	}
	return ParseIndex(data)
}

// ResolveManifest finds ref among index.json's ref names, or as a digest listed there or
// stored as a blob.
func (l *Layout) ResolveManifest(ctx context.Context, ref string) (ocispec.Descriptor, error) {
	if err := ctx.Err(); err != nil {
		return ocispec.Descriptor{}, err
	}
	x, err := l.readIndex()
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	if d, err := digest.Parse(ref); err == nil {
		for _, m := range x.Manifests {
			if m.Digest == d {
				return m, nil
			}
		}
		return l.sniffManifest(d)
	}
	if i := x.Find(ref); i >= 0 {
		return x.Manifests[i], nil
	}
	return ocispec.Descriptor{}, fmt.Errorf("%w: no manifest named %q in %s", ErrNotFound, ref, l.dir)
}

// sniffManifest describes a manifest blob that index.json does not list.
func (l *Layout) sniffManifest(d digest.Digest) (ocispec.Descriptor, error) {
	data, err := readFileLimited(l.blobPath(d), MaxManifestSize)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("image: manifest %s: %w", d, err)
	}
	var head struct {
		MediaType string `json:"mediaType"`
	}
	if err := json.Unmarshal(data, &head); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("%w: blob %s is not a JSON manifest: %v", ErrInvalid, d, err)
	}
	if head.MediaType == "" {
		head.MediaType = ocispec.MediaTypeImageManifest
	}
	return ocispec.Descriptor{MediaType: head.MediaType, Digest: d, Size: int64(len(data))}, nil
}

func (l *Layout) blobPath(d digest.Digest) string {
	return filepath.Join(l.dir, ocispec.ImageBlobsDir, d.Algorithm().String(), d.Encoded())
}

// ReadBlob opens the blob desc names.
func (l *Layout) ReadBlob(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := desc.Digest.Validate(); err != nil { // it becomes a path: no "../" may pass
		return nil, fmt.Errorf("%w: digest %q: %v", ErrInvalid, desc.Digest, err)
	}
	f, err := os.Open(l.blobPath(desc.Digest))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: blob %s in %s", ErrNotFound, desc.Digest, l.dir)
	}
	return f, err
}

// WriteBlob stores r's bytes as the blob desc names, checking size and digest before the blob
// appears. A blob already present with the right size is kept as it is.
func (l *Layout) WriteBlob(ctx context.Context, desc ocispec.Descriptor, r io.Reader) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := desc.Digest.Validate(); err != nil {
		return fmt.Errorf("%w: digest %q: %v", ErrInvalid, desc.Digest, err)
	}
	path := l.blobPath(desc.Digest)
	if fi, err := os.Stat(path); err == nil && fi.Mode().IsRegular() && fi.Size() == desc.Size {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("image: %w", err)
	}
	return atomicfile.WriteFunc(path, 0o644, func(f io.Writer) error {
		v := desc.Digest.Verifier()
		n, err := io.Copy(io.MultiWriter(f, v), io.LimitReader(r, desc.Size+1))
		if err != nil {
			return err
		}
		if n != desc.Size || !v.Verified() {
			return fmt.Errorf("%w: blob %s: got %d bytes, want %d, or different content", ErrDigest, desc.Digest, n, desc.Size)
		}
		return ctx.Err()
	})
}

// PutManifest writes manifest as a blob and points ref at it in index.json.
func (l *Layout) PutManifest(ctx context.Context, ref string, desc ocispec.Descriptor, manifest []byte) error {
	if err := checkRefName(ref); err != nil {
		return err
	}
	if err := l.WriteBlob(ctx, desc, bytes.NewReader(manifest)); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	x, err := l.readIndex()
	if err != nil {
		return err
	}
	if err := x.Tag(ref, desc); err != nil {
		return err
	}
	data, err := x.Marshal()
	if err != nil {
		return err
	}
	return atomicfile.WriteFunc(filepath.Join(l.dir, ocispec.ImageIndexFile), 0o644, func(f io.Writer) error {
		_, err := f.Write(data)
		return err
	})
}

// checkRefName accepts what a ref name annotation may hold: printable, no spaces, bounded.
func checkRefName(ref string) error {
	if ref == "" || len(ref) > 256 || strings.IndexFunc(ref, func(r rune) bool { return !unicode.IsGraphic(r) || unicode.IsSpace(r) }) >= 0 {
		return fmt.Errorf("%w: ref name %q", ErrInvalid, ref)
	}
	return nil
}

// readFileLimited reads a file of at most limit bytes.
func readFileLimited(path string, limit int64) ([]byte, error) {
	data, err := iox.ReadFileLimit(path, limit)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("%w: %s", ErrNotFound, path)
	case errors.Is(err, iox.ErrTooLarge):
		return nil, fmt.Errorf("%w: %w", ErrTooLarge, err)
	}
	return data, err
}
