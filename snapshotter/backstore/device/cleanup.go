package device

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

const mountInfoPath = "/proc/self/mountinfo"

// maxStackedMounts bounds how many FUSE mounts stacked on one directory
// Cleanup removes.
const maxStackedMounts = 16

// Cleanup recovers what a FUSELoop device attached with Options.MountDir
// mountDir leaves behind when its serving process dies (kill -9): it
// detaches the loop devices bound to files of the FUSE mount at mountDir
// and unmounts it. Loop devices still in use (ext4 mounted on them) are set
// to detach at their last close, and the error wraps ErrBusy. Cleanup is
// forceful: used on a live device it aborts that device's FUSE server.
func Cleanup(ctx context.Context, mountDir string) error {
	dir, err := filepath.Abs(mountDir)
	if err != nil {
		return fmt.Errorf("device: cleanup %s: %w", mountDir, err)
	}
	mounts, err := fuseMountsAt(dir)
	if err != nil {
		return err
	}
	devs := make([]uint64, 0, len(mounts))
	for _, m := range mounts {
		devs = append(devs, m.dev)
	}
	// Loop devices first: once the mount is detached their backing paths
	// no longer name it.
	detachErr := detachMatching(ctx, func(name, backing string) bool {
		if isUnder(backing, dir) {
			return true
		}
		dev, err := loopBackingDev(name)
		return err == nil && slices.Contains(devs, dev)
	})
	errs := []error{detachErr}
	for range min(len(mounts), maxStackedMounts) {
		if err := ctx.Err(); err != nil {
			return errors.Join(append(errs, err)...)
		}
		// A loop device still in use holds the mount: no point waiting.
		if err := unmountFUSE(dir, !errors.Is(detachErr, ErrBusy)); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// ForceDetach detaches every loop device whose backing file is path or,
// if path is a directory, lies under it: what a device left behind after
// SwitchToFile moved it onto a local file and its process died with ext4
// still mounted. Devices still in use detach at their last close, and the
// error wraps ErrBusy.
func ForceDetach(ctx context.Context, path string) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return fmt.Errorf("device: detach %s: %w", path, err)
	}
	return detachMatching(ctx, func(_, backing string) bool { return isUnder(backing, abs) })
}

// detachMatching detaches the bound loop devices match selects.
func detachMatching(ctx context.Context, match func(name, backing string) bool) error {
	loops, err := boundLoops()
	if err != nil {
		return fmt.Errorf("device: list loop devices: %w", err)
	}
	names := make([]string, 0, len(loops))
	for name := range loops {
		names = append(names, name)
	}
	slices.Sort(names)
	var errs []error
	for _, name := range names {
		if err := ctx.Err(); err != nil {
			return errors.Join(append(errs, err)...)
		}
		if match(name, loops[name]) {
			errs = append(errs, clearLoop(ctx, name))
		}
	}
	return errors.Join(errs...)
}

// isUnder says whether path is dir or lies under it. A backing file whose
// mount was detached is reported with a " (deleted)" suffix or relative to
// the detached mount, and no longer matches.
func isUnder(path, dir string) bool {
	return path == dir || strings.HasPrefix(path, strings.TrimSuffix(dir, "/")+"/")
}

// fuseMountsAt lists the FUSE mounts whose mount point is dir.
func fuseMountsAt(dir string) ([]mountEntry, error) {
	f, err := os.Open(mountInfoPath)
	if err != nil {
		return nil, fmt.Errorf("device: %w", err)
	}
	defer f.Close()
	all, err := parseMountInfo(f)
	if err != nil {
		return nil, fmt.Errorf("device: %s: %w", mountInfoPath, err)
	}
	var out []mountEntry
	for _, m := range all {
		if m.mountPoint == dir && (m.fsType == "fuse" || strings.HasPrefix(m.fsType, "fuse.")) {
			out = append(out, m)
		}
	}
	return out, nil
}
