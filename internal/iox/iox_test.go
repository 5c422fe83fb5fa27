package iox

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// shortReader answers every read with fewer bytes than asked and no error.
type shortReader struct{}

func (shortReader) ReadAt(p []byte, off int64) (int, error) { return len(p) / 2, nil }

func TestReadAtOrZeros(t *testing.T) {
	p := []byte("xxxxxx")
	if err := ReadAtOrZeros(bytes.NewReader([]byte("abcd")), p, 2); err != nil || string(p) != "cd\x00\x00\x00\x00" {
		t.Errorf("past the end: %q, %v", p, err)
	}
	p = []byte("xx")
	if err := ReadAtOrZeros(nil, p, 0); err != nil || !bytes.Equal(p, []byte{0, 0}) {
		t.Errorf("nil reader: %q, %v", p, err)
	}
	if err := ReadAtOrZeros(shortReader{}, make([]byte, 4), 0); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("short read: %v, want io.ErrUnexpectedEOF", err)
	}
}
