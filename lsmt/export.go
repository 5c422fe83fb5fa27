package lsmt

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
)

// exportChunk is how much of a segment Export reads at a time.
const exportChunk = 1 << 20

// zeroBlock is the granularity at which Export leaves zero data as holes.
const zeroBlock = 4096

// ExportProgress is called as Export writes: done and total count the bytes
// of mapped data examined so far and in all.
type ExportProgress func(done, total int64)

// Export writes the merged disk of s to path as a sparse file: holes, zeroed
// segments and all-zero 4 KiB blocks of data are left as holes. The file
// appears at path only once complete (written to a temporary file beside it,
// fsynced, renamed). It returns the number of bytes written.
func Export(ctx context.Context, path string, s *Stack, progress ExportProgress) (int64, error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return 0, fmt.Errorf("lsmt: export: %w", err)
	}
	defer func() {
		if tmp != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err := tmp.Truncate(s.VirtualSize()); err != nil {
		return 0, fmt.Errorf("lsmt: export: size %s: %w", tmp.Name(), err)
	}
	var total int64
	for _, seg := range s.Segments() {
		if !seg.Zeroed {
			total += int64(seg.Length) * SectorSize
		}
	}
	var done, written int64
	buf := make([]byte, exportChunk)
	for _, seg := range s.Segments() {
		if seg.Zeroed {
			continue
		}
		start, end := int64(seg.Offset)*SectorSize, int64(seg.End())*SectorSize
		for off := start; off < end; off += exportChunk {
			if err := ctx.Err(); err != nil {
				return written, err
			}
			p := buf[:min(exportChunk, end-off)]
			if _, err := s.ReadAt(p, off); err != nil {
				return written, fmt.Errorf("lsmt: export: read disk at %d: %w", off, err)
			}
			n, err := writeNonZero(tmp, p, off)
			written += n
			if err != nil {
				return written, fmt.Errorf("lsmt: export: write %s: %w", tmp.Name(), err)
			}
			done += int64(len(p))
			if progress != nil {
				progress(done, total)
			}
		}
	}
	if err := tmp.Sync(); err != nil {
		return written, fmt.Errorf("lsmt: export: sync: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return written, fmt.Errorf("lsmt: export: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return written, fmt.Errorf("lsmt: export: %w", err)
	}
	tmp = nil
	return written, nil
}

// writeNonZero writes p at off, skipping runs of all-zero blocks so they
// stay holes in a freshly truncated file.
func writeNonZero(f *os.File, p []byte, off int64) (int64, error) {
	var written int64
	for i := 0; i < len(p); {
		j := i
		for j < len(p) && !isZero(p[j:min(j+zeroBlock, len(p))]) {
			j = min(j+zeroBlock, len(p))
		}
		if j > i {
			if _, err := f.WriteAt(p[i:j], off+int64(i)); err != nil {
				return written, err
			}
			written += int64(j - i)
		}
		for j < len(p) && isZero(p[j:min(j+zeroBlock, len(p))]) {
			j = min(j+zeroBlock, len(p))
		}
		i = j
	}
	return written, nil
}

var zeros [zeroBlock]byte

func isZero(b []byte) bool { return bytes.Equal(b, zeros[:len(b)]) }
