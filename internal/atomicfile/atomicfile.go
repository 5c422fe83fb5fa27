// Package atomicfile writes files so that readers see either the old
// content or the new, never a half-written file: write to a temporary file
// in the same directory, fsync it, rename it over the target, fsync the
// directory.
package atomicfile

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// Write atomically replaces path with data.
func Write(path string, data []byte, perm os.FileMode) error {
	return WriteFunc(path, perm, func(w io.Writer) error {
		_, err := io.Copy(w, bytes.NewReader(data))
		return err
	})
}

// WriteFunc makes path hold what write writes, with mode perm, or leaves it
// untouched when write or any step fails.
func WriteFunc(path string, perm os.FileMode, write func(io.Writer) error) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("atomic write %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err = write(f); err != nil {
		return err
	}
	for _, step := range []func() error{func() error { return f.Chmod(perm) }, f.Sync, f.Close,
		func() error { return os.Rename(f.Name(), path) }} {
		if err = step(); err != nil {
			return fmt.Errorf("atomic write %s: %w", path, err)
		}
	}
	// The rename is durable only once the directory is; failing that is not
	// worth failing a write that readers already see.
	if d, derr := os.Open(dir); derr == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
