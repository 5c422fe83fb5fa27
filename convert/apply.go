package convert

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/continuity/fs"
	"golang.org/x/sys/unix"
)

// mountData are the ext4 mount options of a conversion (with MS_NOATIME).
// Each removes a way for the kernel to place blocks by timing or by CPU:
//
//   - nodelalloc: blocks are allocated in write(), in the writer's context,
//     not later by writeback on whatever CPU runs it;
//   - dioread_lock: no unwritten extents converted at I/O completion;
//   - noinit_itable, no_prefetch_block_bitmaps: no background thread zeroing
//     inode tables or loading bitmaps while the allocator runs;
//   - mb_optimize_scan=0: the allocator scans groups in order instead of
//     from lists that background bitmap loading fills;
//   - nombcache: no sharing of xattr blocks through a cache that memory
//     pressure may shrink;
//   - commit=86400: journal commits (which make freed blocks reusable)
//     happen when transactions fill, not every 5 seconds;
//   - nodiscard, nobarrier: nothing is punched, and no flush waits on a
//     disk whose durability does not matter until the layer is committed.
const mountData = "nodelalloc,dioread_lock,nodiscard,noinit_itable,no_prefetch_block_bitmaps," +
	"mb_optimize_scan=0,nombcache,commit=86400,data=ordered,nobarrier"

// mountExt4 mounts the ext4 filesystem on dev at dir for a conversion.
func mountExt4(dev, dir string) error {
	if err := unix.Mount(dev, dir, "ext4", unix.MS_NOATIME, mountData); err != nil {
		return fmt.Errorf("convert: mount -t ext4 -o %s %s %s: %w", mountData, dev, dir, err)
	}
	return nil
}

// unmount unmounts dir, retrying while it is busy for a little while (a
// process walking the tree, udev probing).
func unmount(dir string) error {
	var err error
	for attempt := 0; attempt < 50; attempt++ {
		if err = unix.Unmount(dir, 0); err == nil || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("convert: unmount %s: %w", dir, err)
}

// applyLayer applies the layer tar r to the filesystem mounted at root, as
// containerd unpacks a layer (whiteouts, opaque directories, hard links,
// ownership, modes, xattrs, times), then puts back the times of the
// directories the layer changed without naming them (see dirTimes).
//
// The filesystem calls run on one OS thread pinned to one CPU: ext4 gives
// small files blocks from a per-CPU preallocation, so writes from two CPUs
// can place the same files differently. r is read on that thread too; the
// caller should decompress in another goroutine.
func applyLayer(ctx context.Context, root string, r io.Reader) error {
	done := make(chan error, 1)
	go func() {
		// Never unlocked: the thread's CPU mask was changed, so the runtime
		// must retire the thread when this goroutine ends.
		runtime.LockOSThread()
		if err := pinToOneCPU(); err != nil {
			done <- err
			return
		}
		dt := newDirTimes(root)
		if _, err := archive.Apply(ctx, root, r, archive.WithFilter(dt.observe)); err != nil {
			done <- fmt.Errorf("convert: apply layer: %w", err)
			return
		}
		done <- dt.restore()
	}()
	return <-done
}

// pinToOneCPU restricts the calling thread to the lowest-numbered CPU it
// may run on.
func pinToOneCPU() error {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		return fmt.Errorf("convert: sched_getaffinity: %w", err)
	}
	for cpu := 0; cpu < len(set)*64; cpu++ {
		if set.IsSet(cpu) {
			set.Zero()
			set.Set(cpu)
			if err := unix.SchedSetaffinity(0, &set); err != nil {
				return fmt.Errorf("convert: sched_setaffinity to CPU %d: %w", cpu, err)
			}
			return nil
		}
	}
	return errors.New("convert: this thread may run on no CPU")
}

// dirTimes keeps the times of the directories a layer changes without
// naming them. Adding or removing an entry sets its directory's mtime to
// now, and so do the parents the unpacker creates; containerd sets the
// times only of directories the tar lists. Those others get back the times
// they had before the layer, or, when the layer created them, the newest
// mtime in the layer, so the result does not depend on the clock.
type dirTimes struct {
	root   string
	before map[string]*[2]unix.Timespec // nil value: did not exist
	listed map[string]bool              // directories the tar has entries for
	newest time.Time
	// lastDir and lastParent cache the resolution of the previous entry's
	// directory: tars list a directory's entries together, and entries in
	// one directory cannot change how its own path resolves.
	lastDir, lastParent string
}

func newDirTimes(root string) *dirTimes {
	return &dirTimes{root: root, before: make(map[string]*[2]unix.Timespec), listed: make(map[string]bool)}
}

// observe is called by archive.Apply with each header (its name cleaned)
// before the entry is applied, so the directories it will touch still have
// their old times.
func (d *dirTimes) observe(h *tar.Header) (bool, error) {
	if h.ModTime.After(d.newest) {
		d.newest = h.ModTime
	}
	rawDir := filepath.Dir(h.Name)
	if rawDir != d.lastDir || d.lastParent == "" {
		parent, err := fs.RootPath(d.root, rawDir)
		if err != nil {
			return false, fmt.Errorf("convert: resolve %q: %w", h.Name, err)
		}
		d.lastDir, d.lastParent = rawDir, parent
	}
	parent := d.lastParent
	if h.Typeflag == tar.TypeDir && filepath.Clean(h.Name) != "." {
		d.listed[filepath.Join(parent, filepath.Base(h.Name))] = true
		// The directory's own entries resolve through it, maybe newly
		// created or replaced: forget the cache.
		d.lastParent = ""
	}
	// The parent and, if the unpacker must create it, its missing
	// ancestors up to the first one that exists.
	for p := parent; ; p = filepath.Dir(p) {
		if _, seen := d.before[p]; seen {
			break
		}
		var st unix.Stat_t
		err := unix.Lstat(p, &st)
		if err == nil {
			d.before[p] = &[2]unix.Timespec{st.Atim, st.Mtim}
			break
		}
		if !errors.Is(err, unix.ENOENT) {
			return false, fmt.Errorf("convert: stat %s: %w", p, err)
		}
		d.before[p] = nil
		if p == d.root {
			break
		}
	}
	return true, nil
}

// restore sets the times of the directories observe recorded.
func (d *dirTimes) restore() error {
	created := unix.NsecToTimespec(d.newest.UnixNano())
	if d.newest.IsZero() {
		created = unix.Timespec{}
	}
	for p, ts := range d.before {
		if d.listed[p] {
			continue
		}
		fi, err := os.Lstat(p)
		if err != nil || !fi.IsDir() {
			continue // removed or replaced by the layer
		}
		t := [2]unix.Timespec{created, created}
		if ts != nil {
			t = *ts
		}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, t[:], unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("convert: set times of %s: %w", p, err)
		}
	}
	return nil
}
