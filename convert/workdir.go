package convert

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/snapshotter/backstore/device"
)

const (
	workDirPattern = "obd-convert-"
	workLockFile   = "lock"
)

// workDir is a conversion's directory for writable layers, mounts and
// downloads. It holds a lock file, flocked while the conversion runs; the
// kernel drops the lock when the process dies, so a directory whose lock
// is free was left by a converter that was killed.
type workDir struct {
	path string
	lock *os.File
}

func newWorkDir(parent string) (*workDir, error) {
	path, err := os.MkdirTemp(parent, workDirPattern)
	if err != nil {
		return nil, fmt.Errorf("convert: work directory: %w", err)
	}
	lock, err := os.Create(filepath.Join(path, workLockFile))
	if err == nil {
		err = unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	}
	if err != nil {
		if lock != nil {
			lock.Close()
		}
		os.RemoveAll(path)
		return nil, fmt.Errorf("convert: lock work directory: %w", err)
	}
	return &workDir{path: path, lock: lock}, nil
}

// remove deletes the directory and drops its lock.
func (w *workDir) remove() error {
	err := os.RemoveAll(w.path)
	w.lock.Close()
	return err
}

// reclaimStale cleans up after converters that were killed while building
// a layer in parent: for each work directory whose lock is free, it
// unmounts the layer's ext4 filesystem, detaches the loop device and the
// FUSE mount behind it (device.Cleanup) and deletes the directory. It
// returns the directories it removed.
func reclaimStale(ctx context.Context, parent string) ([]string, error) {
	dirs, err := filepath.Glob(filepath.Join(parent, workDirPattern+"*"))
	if err != nil {
		return nil, err
	}
	var removed []string
	var errs []error
	for _, dir := range dirs {
		lock, err := os.Open(filepath.Join(dir, workLockFile))
		if err != nil {
			continue // being created, or not ours
		}
		if unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
			lock.Close()
			continue // a live conversion
		}
		err = reclaim(ctx, dir)
		lock.Close()
		if err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, dir)
	}
	return removed, errors.Join(errs...)
}

func reclaim(ctx context.Context, dir string) error {
	layers, _ := filepath.Glob(filepath.Join(dir, "layer-*"))
	for _, l := range layers {
		// The filesystem sits on a loop device whose FUSE server is gone:
		// detach it lazily, then take the device down.
		if err := unix.Unmount(filepath.Join(l, "mnt"), unix.MNT_DETACH); err != nil &&
			!errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("convert: reclaim %s: unmount: %w", l, err)
		}
		if err := device.Cleanup(ctx, filepath.Join(l, "fuse")); err != nil {
			return fmt.Errorf("convert: reclaim %s: %w", l, err)
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("convert: reclaim %s: %w", dir, err)
	}
	return nil
}
