package iox

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
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

func TestReadFileLimit(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	if err := os.WriteFile(path, []byte("12345"), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, err := ReadFileLimit(path, 5); err != nil || string(b) != "12345" {
		t.Errorf("at the limit: %q, %v", b, err)
	}
	_, err := ReadFileLimit(path, 4)
	var tl *TooLargeError
	if !errors.Is(err, ErrTooLarge) || !errors.As(err, &tl) || tl.Path != path || tl.Limit != 4 {
		t.Errorf("over the limit: %v (%#v)", err, tl)
	}
	if _, err := ReadFileLimit(filepath.Join(dir, "none"), 4); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: %v, want fs.ErrNotExist", err)
	}
	// An endless file stops at the limit instead of filling memory.
	if _, err := ReadFileLimit("/dev/zero", 1<<20); !errors.Is(err, ErrTooLarge) {
		t.Errorf("/dev/zero: %v, want ErrTooLarge", err)
	}
}
