package device

import (
	"fmt"
	"io"
	"os"
)

// readerImage is an io.ReaderAt of a known size.
type readerImage struct {
	io.ReaderAt
	size int64
}

func (r readerImage) Size() int64 { return r.size }

// NewImage presents r, a disk of size bytes, as an Image. For an lsmt.Stack
// that is NewImage(stack, stack.VirtualSize()).
func NewImage(r io.ReaderAt, size int64) Image {
	return readerImage{ReaderAt: r, size: size}
}

// FileImage is an image held in a plain local file, byte for byte. It
// implements LocalFile, so the FUSE frontend can pass reads through to it.
type FileImage struct {
	f    *os.File
	size int64
}

// OpenFileImage opens the local file at path as a read-only image.
func OpenFileImage(path string) (*FileImage, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("device: open image file: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("device: image file: %w", err)
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("%w: %s is not a regular file", ErrSize, path)
	}
	return &FileImage{f: f, size: st.Size()}, nil
}

// ReadAt reads the image.
func (i *FileImage) ReadAt(p []byte, off int64) (int, error) { return i.f.ReadAt(p, off) }

// Size is the file's size when it was opened.
func (i *FileImage) Size() int64 { return i.size }

// File returns the open file.
func (i *FileImage) File() *os.File { return i.f }

// Close closes the file.
func (i *FileImage) Close() error { return i.f.Close() }
