package convert

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// compression is how a layer blob's tar is compressed.
type compression int

const (
	uncompressed compression = iota
	gzipped
	zstdCompressed
)

// compressionOf maps a layer media type to its compression.
func compressionOf(mediaType string) (compression, error) {
	switch mediaType {
	case ocispec.MediaTypeImageLayer, mediaTypeDockerLayer:
		return uncompressed, nil
	case ocispec.MediaTypeImageLayerGzip, mediaTypeDockerLayerGzip:
		return gzipped, nil
	case ocispec.MediaTypeImageLayerZstd:
		return zstdCompressed, nil
	}
	return 0, fmt.Errorf("%w: layer media type %q", ErrUnsupportedLayer, mediaType)
}

// maxZstdWindow bounds the memory a zstd frame header can make the decoder
// allocate; it is the zstd tool's default limit, far above what container
// tools use.
const maxZstdWindow = 128 << 20

var (
	gzipMagic = []byte{0x1F, 0x8B}
	zstdMagic = []byte{0x28, 0xB5, 0x2F, 0xFD}
)

// layerReader reads a layer blob's tar, checking as it goes that the blob
// matches its digest and the tar its diff_id. Close reports a mismatch
// (or a blob that was not read to its end) as ErrDigest; a consumer must
// read the tar to EOF first.
type layerReader struct {
	blob    io.ReadCloser
	counted *countingReader // compressed bytes read
	tar     io.Reader
	dec     io.Closer
	blobV   digest.Verifier
	diffV   digest.Verifier
	desc    ocispec.Descriptor
	diffID  digest.Digest
	tarSize int64
}

// newLayerReader wraps blob, the layer desc names with diff_id diffID. The
// compression is taken from the content's magic when it disagrees with the
// media type, as container runtimes do.
func newLayerReader(blob io.ReadCloser, desc ocispec.Descriptor, diffID digest.Digest) (*layerReader, error) {
	if _, err := compressionOf(desc.MediaType); err != nil {
		return nil, err
	}
	if err := diffID.Validate(); err != nil {
		return nil, fmt.Errorf("%w: diff_id %q: %v", ErrInvalidImage, diffID, err)
	}
	lr := &layerReader{blob: blob, desc: desc, diffID: diffID,
		blobV: desc.Digest.Verifier(), diffV: diffID.Verifier()}
	lr.counted = &countingReader{r: io.TeeReader(io.LimitReader(blob, desc.Size), lr.blobV)}
	br := bufio.NewReaderSize(lr.counted, 1<<20)
	head, err := br.Peek(4)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("convert: read layer %s: %w", desc.Digest, err)
	}
	var plain io.Reader = br
	switch {
	case bytes.HasPrefix(head, gzipMagic):
		gz, err := gzip.NewReader(br)
		if err != nil {
			return nil, fmt.Errorf("%w: layer %s: gzip: %v", ErrInvalidImage, desc.Digest, err)
		}
		gz.Multistream(true)
		plain, lr.dec = gz, gz
	case bytes.HasPrefix(head, zstdMagic):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(maxZstdWindow))
		if err != nil {
			return nil, fmt.Errorf("%w: layer %s: zstd: %v", ErrInvalidImage, desc.Digest, err)
		}
		plain, lr.dec = zr, closerFunc(func() error { zr.Close(); return nil })
	}
	lr.tar = io.TeeReader(plain, lr.diffV)
	return lr, nil
}

// Read reads the layer's tar.
func (lr *layerReader) Read(p []byte) (int, error) {
	n, err := lr.tar.Read(p)
	lr.tarSize += int64(n)
	if err != nil && !errors.Is(err, io.EOF) {
		err = fmt.Errorf("%w: layer %s: %v", ErrInvalidImage, lr.desc.Digest, err)
	}
	return n, err
}

// CompressedRead is the number of blob bytes read so far.
func (lr *layerReader) CompressedRead() int64 { return lr.counted.n.Load() }

// Close drains what is left of the tar stream and the blob, verifies both
// digests and closes the blob.
func (lr *layerReader) Close() error {
	_, drainErr := io.Copy(io.Discard, lr)
	if lr.dec != nil {
		lr.dec.Close()
	}
	_, blobErr := io.Copy(io.Discard, lr.counted)
	lr.blob.Close()
	switch {
	case drainErr != nil:
		return drainErr
	case blobErr != nil:
		return fmt.Errorf("convert: read layer %s: %w", lr.desc.Digest, blobErr)
	case lr.counted.n.Load() != lr.desc.Size || !lr.blobV.Verified():
		return fmt.Errorf("%w: layer blob %s: %d bytes read, %d expected, or different content",
			ErrDigest, lr.desc.Digest, lr.counted.n.Load(), lr.desc.Size)
	case !lr.diffV.Verified():
		return fmt.Errorf("%w: layer %s: its tar does not match diff_id %s", ErrDigest, lr.desc.Digest, lr.diffID)
	}
	return nil
}

type closerFunc func() error

func (f closerFunc) Close() error { return f() }
