// Package iox holds the small io helpers that several packages of the
// project share.
package iox

import (
	"errors"
	"fmt"
	"io"
	"os"
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

// ErrTooLarge is matched (errors.Is) by the error ReadFileLimit returns for
// a file over its limit.
var ErrTooLarge = errors.New("file too large")

// TooLargeError says which file was over which limit.
type TooLargeError struct {
	Path  string
	Limit int64
}

func (e *TooLargeError) Error() string { return fmt.Sprintf("%s is over %d bytes", e.Path, e.Limit) }

// Is makes errors.Is(err, ErrTooLarge) true.
func (e *TooLargeError) Is(target error) bool { return target == ErrTooLarge }

// ReadFileLimit reads the file at path, which must be at most limit bytes:
// files of outside origin (traces, stats, specs, configs) are read whole,
// and a huge or endless one (a FIFO, /dev/zero) must not take the
// process's memory. Errors from opening and reading are os.Open's and
// Read's, unwrapped, so that callers can test for fs.ErrNotExist; a file
// over the limit gives a *TooLargeError.
func ReadFileLimit(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, &TooLargeError{Path: path, Limit: limit}
	}
	return data, nil
}
