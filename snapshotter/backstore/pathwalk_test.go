package backstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

func openDir(t *testing.T, dir string) int {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// TestReadDirNames reads a directory of more entries than one getdents
// batch: all of them, sorted, or none past the limit.
func TestReadDirNames(t *testing.T) {
	dir := t.TempDir()
	var want []string
	for i := 0; i < 4500; i++ {
		name := fmt.Sprintf("f%05d", (i*7919)%4500)
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o644); err != nil {
			t.Fatal(err)
		}
		want = append(want, name)
	}
	slices.Sort(want)
	fd := openDir(t, dir)
	names, err := readDirNames(fd, 4500)
	if err != nil || !slices.Equal(names, want) {
		t.Fatalf("readDirNames: %d names (%v), want %d sorted", len(names), err, len(want))
	}
	if names, err := readDirNames(fd, 4499); !errors.Is(err, errDirTooLarge) || names != nil {
		t.Errorf("over the limit: %d names, %v; want errDirTooLarge", len(names), err)
	}
}

// TestWalkFileCap walks a tree holding more files than the cap: it takes
// the first files in name order whatever order the kernel lists them in,
// and counts every entry it drops as skipped.
func TestWalkFileCap(t *testing.T) {
	dir := t.TempDir()
	for _, p := range []string{"e", "a/c", "a/b", "d", "a/z/y", "f"} {
		path := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(p), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var st PathListStats
	var taken []string
	w := &pathWalker{ctx: context.Background(), st: &st, maxFiles: 3, maxDir: 100,
		extents: func(_ context.Context, fd int, _ int64, _ func(phys, n int64)) error {
			b := make([]byte, 8)
			n, _ := unix.Pread(fd, b, 0)
			taken = append(taken, string(b[:n]))
			return nil
		}}
	w.walk(openDir(t, dir), 0)
	// Name order: a/b, a/c, a/z/y, d, e, f. Cap 3: a/b, a/c, a/z/y taken;
	// d trips the cap, e and f are not visited.
	if want := []string{"a/b", "a/c", "a/z/y"}; !slices.Equal(taken, want) {
		t.Errorf("took %q, want %q", taken, want)
	}
	if st.Files != 3 || st.Skipped != 3 || !w.full {
		t.Errorf("stats %+v (full %v), want 3 files and 3 skipped", st, w.full)
	}

	// A directory over its entry limit is skipped as one entry.
	st, taken = PathListStats{}, nil
	w = &pathWalker{ctx: context.Background(), st: &st, maxFiles: 100, maxDir: 3, extents: w.extents}
	w.walk(openDir(t, dir), 0)
	if st.Files != 0 || st.Skipped != 1 || len(taken) != 0 {
		t.Errorf("a directory of 4 entries, limit 3: %+v, took %q; want 1 skipped", st, taken)
	}
}
