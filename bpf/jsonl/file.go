package jsonl

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// File is an output file that appears at its path only once complete: it is
// written to a temporary file in the same directory, fsynced and renamed over
// the path, so readers never see a partial capture, even after a crash.
//
// Where the filesystem supports it the temporary file is unnamed (O_TMPFILE)
// until Commit, so a process killed mid-capture leaves no debris behind.
//
// A path that exists and is not a regular file (/dev/null, a FIFO, a
// terminal) is written directly: renaming over it would replace the device.
type File struct {
	f       *os.File
	path    string
	unnamed bool
	direct  bool
	done    bool
}

// CreateFile starts writing a file that Commit will publish at path.
func CreateFile(path string) (*File, error) {
	if st, err := os.Stat(path); err == nil && !st.Mode().IsRegular() {
		if st.IsDir() {
			return nil, fmt.Errorf("jsonl: output %s is a directory", path)
		}
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			return nil, fmt.Errorf("jsonl: open output: %w", err)
		}
		return &File{f: f, path: path, direct: true}, nil
	}
	dir := filepath.Dir(path)
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_WRONLY|unix.O_CLOEXEC, 0o644)
	if err == nil {
		return &File{f: os.NewFile(uintptr(fd), path+".tmp"), path: path, unnamed: true}, nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EISDIR) && !errors.Is(err, unix.EINVAL) {
		return nil, fmt.Errorf("jsonl: create output in %s: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("jsonl: create output next to %s: %w", path, err)
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, fmt.Errorf("jsonl: chmod %s: %w", f.Name(), err)
	}
	return &File{f: f, path: path}, nil
}

// Write writes to the temporary file.
func (f *File) Write(p []byte) (int, error) { return f.f.Write(p) }

// Commit fsyncs the data, renames the file into place and fsyncs the
// directory so the rename itself survives a crash.
func (f *File) Commit() error {
	if f.done {
		return errors.New("jsonl: output already committed or aborted")
	}
	f.done = true
	if f.direct {
		if err := f.f.Close(); err != nil {
			return fmt.Errorf("jsonl: close output %s: %w", f.path, err)
		}
		return nil
	}
	if err := f.f.Sync(); err != nil {
		f.discard()
		return fmt.Errorf("jsonl: fsync output for %s: %w", f.path, err)
	}
	tmp := f.f.Name()
	if f.unnamed {
		// linkat cannot replace an existing file: give it a fresh name,
		// then rename over the target as in the named case.
		var err error
		if tmp, err = f.link(); err != nil {
			f.discard()
			return err
		}
	}
	if err := f.f.Close(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("jsonl: close output for %s: %w", f.path, err)
	}
	if err := os.Rename(tmp, f.path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("jsonl: publish output: %w", err)
	}
	d, err := os.Open(filepath.Dir(f.path))
	if err != nil {
		return fmt.Errorf("jsonl: open directory of %s: %w", f.path, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("jsonl: fsync directory of %s: %w", f.path, err)
	}
	return nil
}

// link gives the unnamed file a temporary name next to the target.
func (f *File) link() (string, error) {
	proc := "/proc/self/fd/" + strconv.Itoa(int(f.f.Fd()))
	for attempt := 0; ; attempt++ {
		tmp := filepath.Join(filepath.Dir(f.path), fmt.Sprintf(".%s.tmp-%d-%d",
			filepath.Base(f.path), os.Getpid(), time.Now().UnixNano()))
		err := unix.Linkat(unix.AT_FDCWD, proc, unix.AT_FDCWD, tmp, unix.AT_SYMLINK_FOLLOW)
		if err == nil {
			return tmp, nil
		}
		if !errors.Is(err, unix.EEXIST) || attempt == 10 {
			return "", fmt.Errorf("jsonl: name output for %s: %w", f.path, err)
		}
	}
}

func (f *File) discard() {
	f.f.Close()
	if !f.unnamed {
		os.Remove(f.f.Name())
	}
}

// Abort discards the temporary file; after Commit it does nothing.
func (f *File) Abort() error {
	if f.done {
		return nil
	}
	f.done = true
	err := f.f.Close()
	if !f.unnamed && !f.direct {
		err = errors.Join(err, os.Remove(f.f.Name()))
	}
	return err
}
