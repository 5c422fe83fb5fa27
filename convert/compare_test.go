package convert

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/pkg/archive"
	"golang.org/x/sys/unix"
)

// fileInfo is what the tree comparison looks at for one path.
type fileInfo struct {
	mode      uint32 // type and permission bits, setuid and friends
	uid, gid  uint32
	size      int64
	content   string // sha256 of a regular file
	target    string // of a symlink
	rdev      uint64
	mtime     int64 // nanoseconds; not compared for directories
	nlink     uint64
	xattrs    map[string]string
	linkGroup string // the sorted paths sharing this inode, for files with links
}

// scanTree records every path under root but root itself and the names
// in skip (relative to root).
func scanTree(t testing.TB, root string, skip ...string) map[string]*fileInfo {
	t.Helper()
	out := make(map[string]*fileInfo)
	inodes := make(map[uint64][]string)
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		if slices.Contains(skip, rel) {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		fi, err := statFile(p)
		if err != nil {
			return err
		}
		out[rel] = fi
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR && st.Nlink > 1 {
			inodes[st.Ino] = append(inodes[st.Ino], rel)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("scan %s: %v", root, err)
	}
	for _, paths := range inodes {
		sort.Strings(paths)
		for _, p := range paths {
			out[p].linkGroup = strings.Join(paths, ",")
		}
	}
	return out
}

func statFile(p string) (*fileInfo, error) {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return nil, err
	}
	fi := &fileInfo{mode: st.Mode, uid: st.Uid, gid: st.Gid, size: st.Size, rdev: st.Rdev, nlink: st.Nlink,
		mtime: st.Mtim.Nano()}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		sum, err := fileSHA256(p)
		if err != nil {
			return nil, err
		}
		fi.content = sum
	case unix.S_IFLNK:
		target, err := os.Readlink(p)
		if err != nil {
			return nil, err
		}
		fi.target = target
	case unix.S_IFDIR:
		fi.mtime, fi.size, fi.nlink = 0, 0, 0 // sizes depend on the filesystem's history
	}
	var err error
	fi.xattrs, err = xattrs(p)
	return fi, err
}

func fileSHA256(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func xattrs(p string) (map[string]string, error) {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		if errors.Is(err, unix.ENOTSUP) {
			return nil, nil
		}
		return nil, fmt.Errorf("listxattr %s: %w", p, err)
	}
	out := make(map[string]string)
	for _, name := range strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		if name == "" {
			continue
		}
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, name, v)
		if err != nil {
			return nil, fmt.Errorf("getxattr %s %s: %w", p, name, err)
		}
		out[name] = string(v[:m])
	}
	return out, nil
}

// compareTrees reports every difference between two scanned trees.
func compareTrees(t testing.TB, want, got map[string]*fileInfo) {
	t.Helper()
	diffs := 0
	report := func(format string, args ...any) {
		if diffs++; diffs <= 30 {
			t.Errorf(format, args...)
		}
	}
	for p, w := range want {
		g, ok := got[p]
		if !ok {
			report("%s: missing from the converted image", p)
			continue
		}
		if fmt.Sprint(*w) != fmt.Sprint(*g) {
			report("%s differs:\n  want %+v\n  got  %+v", p, *w, *g)
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			report("%s: in the converted image only", p)
		}
	}
	if diffs > 30 {
		t.Errorf("... %d differences in all", diffs)
	}
}

// unpackReference unpacks layer tars, bottom first, into dir the way
// containerd does.
func unpackReference(t testing.TB, dir string, tars ...string) {
	t.Helper()
	for _, p := range tars {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		_, err = archive.Apply(context.Background(), dir, f)
		f.Close()
		if err != nil {
			t.Fatalf("unpack %s: %v", p, err)
		}
	}
}
