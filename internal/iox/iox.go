// Package iox holds the small io helpers that several packages of the
// project share.
package iox

import (
	"errors"
	"io"
)

// ReadAtOrZeros fills p from r at off; what lies past r's end, or all of p
// when r is nil, reads as zeros. A short read that is not at r's end is
// io.ErrUnexpectedEOF.
func ReadAtOrZeros(r io.ReaderAt, p []byte, off int64) error {
	if r == nil {
		clear(p)
		return nil
	}
	n, err := r.ReadAt(p, off)
	if errors.Is(err, io.EOF) {
		clear(p[n:])
		return nil
	}
	if err == nil && n < len(p) {
		return io.ErrUnexpectedEOF
	}
	return err
}
