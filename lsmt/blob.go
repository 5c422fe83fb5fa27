package lsmt

import (
	"fmt"
	"io"

	"github.com/obdtrace/obdtrace/lsmt/tarwrap"
	"github.com/obdtrace/obdtrace/lsmt/zfile"
)

// Blob is a layer blob as stored in a registry, its wrappers peeled: the
// optional tar wrapper, the optional ZFile compression, and the LSMT layer
// inside.
type Blob struct {
	*Layer
	// TarWrapped says a tar wrapper was found; the LSMT (or ZFile) payload
	// is PayloadSize bytes at PayloadOffset of the blob.
	TarWrapped    bool
	PayloadOffset int64
	PayloadSize   int64
	// ZFile is the decompressing reader when the payload is compressed, else
	// nil. Its CompressedRange translates layer offsets into payload ranges.
	ZFile *zfile.Reader
}

// OpenBlob opens a layer blob of size bytes held by r, detecting each
// wrapper by its magic.
func OpenBlob(r io.ReaderAt, size int64) (*Blob, error) {
	payload, wrapped, err := tarwrap.NewReader(r, size)
	if err != nil {
		return nil, fmt.Errorf("lsmt: tar wrapper: %w", err)
	}
	b := &Blob{TarWrapped: wrapped, PayloadSize: payload.Size()}
	if wrapped {
		_, b.PayloadOffset, _ = payload.Outer()
	}
	var layerSrc io.ReaderAt = payload
	layerSize := payload.Size()
	isZ, err := zfile.IsZFile(payload, payload.Size())
	if err != nil {
		return nil, fmt.Errorf("lsmt: %w", err)
	}
	if isZ {
		z, err := zfile.NewReader(payload, payload.Size())
		if err != nil {
			return nil, fmt.Errorf("lsmt: %w", err)
		}
		b.ZFile, layerSrc, layerSize = z, z, z.Size()
	}
	if b.Layer, err = Open(layerSrc, layerSize); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

// Close releases the decompressor's resources; it does not close the
// underlying reader.
func (b *Blob) Close() error {
	if b.ZFile != nil {
		return b.ZFile.Close()
	}
	return nil
}

// BlobRange returns the byte range [start, end) of the blob that holds the
// layer bytes [off, off+n) of the LSMT byte space: through the ZFile jump
// table when compressed, shifted by the tar wrapper's payload offset. It is
// what a prefetcher fetches to make those layer bytes local.
func (b *Blob) BlobRange(off, n int64) (start, end int64, err error) {
	if off < 0 || n < 0 || off >= b.Layer.Size() {
		return 0, 0, fmt.Errorf("lsmt: range [%d, +%d) outside the %d-byte layer", off, n, b.Layer.Size())
	}
	n = min(n, b.Layer.Size()-off)
	if b.ZFile == nil {
		return b.PayloadOffset + off, b.PayloadOffset + off + n, nil
	}
	start, end, err = b.ZFile.CompressedRange(off, n)
	if err != nil {
		return 0, 0, err
	}
	return b.PayloadOffset + start, b.PayloadOffset + end, nil
}
