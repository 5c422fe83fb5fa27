package device

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// serverStopTimeout bounds the wait for the FUSE server's goroutines after
// its mount is gone, so Close reports a stuck server instead of hanging.
const serverStopTimeout = 10 * time.Second

// FUSELoop is the frontend for kernels with FUSE and loop devices only: the
// image is the one file of a private FUSE mount served by this process, and
// a loop device is bound to that file. The device lives as long as this
// process keeps serving it; Cleanup recovers what a killed process left.
type FUSELoop struct{}

var _ Frontend = FUSELoop{}

// Attach mounts the image's FUSE file system in opts.MountDir and binds a
// loop device to its file.
func (FUSELoop) Attach(ctx context.Context, img Image, opts Options) (Device, error) {
	t := opts.tuning()
	if opts.Tuning == nil && img.Size()%int64(t.LoopBlockSize) != 0 {
		t.LoopBlockSize = 512 // the default fits the image rather than refuse it
	}
	if err := checkAttach(img, opts, t); err != nil {
		return nil, err
	}
	var writable WritableImage
	if opts.Writable {
		writable = img.(WritableImage) // checked by checkAttach
	}
	dir, ownDir := opts.MountDir, false
	if dir == "" {
		var err error
		if dir, err = os.MkdirTemp("", "obd-device-"); err != nil {
			return nil, fmt.Errorf("device: mount directory: %w", err)
		}
		ownDir = true
	} else if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("device: mount directory: %w", err)
	}
	d := &fuseLoopDevice{
		log:      opts.Logger.With().Str("component", "device").Logger(),
		tuning:   t,
		readOnly: writable == nil,
		size:     img.Size(),
		mountDir: dir,
		ownDir:   ownDir,
		served:   make(chan struct{}),
	}
	if err := d.start(ctx, newImageFS(img, writable, t)); err != nil {
		if ownDir {
			os.Remove(dir)
		}
		return nil, err
	}
	d.log.Debug().Str("dev", d.loop.path).Str("mount", dir).Int64("size", d.size).Msg("attached")
	return d, nil
}

func checkAttach(img Image, opts Options, t Tuning) error {
	size := img.Size()
	if size <= 0 || size%512 != 0 {
		return fmt.Errorf("%w: image size %d is not a positive multiple of 512", ErrSize, size)
	}
	switch t.LoopBlockSize {
	case 0, 512, 1024, 2048, 4096:
	default:
		return fmt.Errorf("%w: loop block size %d, want 512, 1024, 2048 or 4096", ErrSize, t.LoopBlockSize)
	}
	if t.LoopBlockSize != 0 && size%int64(t.LoopBlockSize) != 0 {
		return fmt.Errorf("%w: image size %d is not a multiple of the block size %d", ErrSize, size, t.LoopBlockSize)
	}
	if _, ok := img.(WritableImage); opts.Writable && !ok {
		return fmt.Errorf("%w: %T has no WriteAt, Discard and Sync", ErrNotWritable, img)
	}
	return nil
}

// fuseLoopDevice is a loop device over the file of a FUSE mount.
type fuseLoopDevice struct {
	log      zerolog.Logger
	tuning   Tuning
	readOnly bool
	size     int64
	mountDir string
	ownDir   bool // made by Attach, removed by Close

	fs     *imageFS
	server *fuse.Server
	served chan struct{} // closed when the server's Serve returns

	mu       sync.Mutex
	loop     *loopDev
	file     *os.File // the FUSE file the loop device reads, open while fuseDown is false
	fuseDown bool     // the FUSE mount is gone (switched to a local file)
	closed   bool
}

var _ ReadAheadLimiter = (*fuseLoopDevice)(nil)

// start mounts and serves fs, then binds a loop device to its file.
func (d *fuseLoopDevice) start(ctx context.Context, fs *imageFS) error {
	t := d.tuning
	d.fs = fs
	srv, err := fuse.NewServer(fs, d.mountDir, &fuse.MountOptions{
		DirectMountStrict: true,
		FsName:            "obdtrace",
		Name:              "obdtrace",
		MaxWrite:          t.MaxRead,
		MaxBackground:     64,
		SyncRead:          t.SyncRead,
		DisableXAttrs:     true,
		// The file changes only through this mount, so the kernel need not
		// drop its cache when it sees a new mtime.
		ExplicitDataCacheControl: true,
		DisableReadDirPlus:       true,
		Logger:                   log.New(d.log, "", 0),
	})
	if err != nil {
		return fmt.Errorf("device: mount FUSE at %s: %w", d.mountDir, err)
	}
	d.server = srv
	go func() {
		srv.Serve()
		close(d.served)
	}()
	if err := srv.WaitMount(); err != nil {
		return errors.Join(fmt.Errorf("device: mount FUSE at %s: %w", d.mountDir, err), d.stopFUSE(true))
	}
	if t.ReadAhead > 0 {
		if err := setReadAhead(d.mountDir, t.ReadAhead); err != nil {
			return errors.Join(err, d.stopFUSE(true))
		}
	}
	mode := os.O_RDONLY
	if !d.readOnly {
		mode = os.O_RDWR
	}
	f, err := os.OpenFile(filepath.Join(d.mountDir, imageFileName), mode|unix.O_CLOEXEC, 0)
	if err != nil {
		return errors.Join(fmt.Errorf("device: open the FUSE image file: %w", err), d.stopFUSE(true))
	}
	d.loop, err = attachLoop(ctx, f, loopConfig{readOnly: d.readOnly, directIO: t.LoopDirectIO, blockSize: t.LoopBlockSize})
	if err != nil {
		f.Close()
		return errors.Join(err, d.stopFUSE(true))
	}
	// Kept open: the loop device reads through this open file (its own
	// reference to it), so fadvise on it sets the loop device's readahead.
	d.file = f
	return nil
}

func (d *fuseLoopDevice) Path() string { return d.loop.path }

func (d *fuseLoopDevice) Dev() (major, minor uint32) {
	return unix.Major(d.loop.rdev), unix.Minor(d.loop.rdev)
}

// SwitchToFile moves the loop device onto the local file at path with
// LOOP_CHANGE_FD, then unmounts the FUSE file system; the kernel lets
// requests in flight finish on the FUSE file first, so raw readers of the
// device carry on undisturbed. Only read-only devices can switch.
//
// A device with a file system mounted on it is refused with ErrBusy: since
// Linux 6.6 LOOP_CHANGE_FD reports a media change that shuts the mounted
// file system down (ext4 logs "shut down requested" and fails every I/O
// after). The device is claimed exclusively for the switch, so nothing can
// mount it meanwhile. docs/device.md has the details.
func (d *fuseLoopDevice) SwitchToFile(ctx context.Context, path string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	if !d.readOnly {
		return fmt.Errorf("%w: only a read-only loop device can change its file", ErrUnsupported)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("device: switch to file: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("device: switch to file: %w", err)
	}
	if !st.Mode().IsRegular() || st.Size() != d.size {
		return fmt.Errorf("%w: %s (%v, %d bytes) cannot replace an image of %d bytes", ErrSize, path, st.Mode().Type(), st.Size(), d.size)
	}
	claim, err := d.loop.claim()
	if err != nil {
		return err
	}
	err = d.loop.changeFD(claim, f)
	claim.Close()
	if err != nil {
		return err
	}
	d.log.Debug().Str("dev", d.loop.path).Str("file", path).Msg("switched to local file")
	var errs []error
	if d.tuning.SwitchDirectIO {
		errs = append(errs, d.loop.setDirectIO(true))
	}
	if !d.fuseDown {
		d.fuseDown = true
		d.file.Close()
		errs = append(errs, d.stopFUSE(true))
	}
	return errors.Join(errs...)
}

// LimitReadAhead turns the FUSE file's readahead off (POSIX_FADV_RANDOM:
// the loop driver's reads fetch exactly their pages) or back to the
// mount's (POSIX_FADV_NORMAL: Tuning.ReadAhead). A device switched to a
// local file has no FUSE file left to limit.
func (d *fuseLoopDevice) LimitReadAhead(on bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed || d.fuseDown {
		return nil
	}
	advice := unix.FADV_NORMAL
	if on {
		advice = unix.FADV_RANDOM
	}
	if err := unix.Fadvise(int(d.file.Fd()), 0, 0, advice); err != nil {
		return fmt.Errorf("device: fadvise the FUSE file of %s: %w", d.loop.path, err)
	}
	return nil
}

// Close detaches the loop device and unmounts the FUSE file system. If the
// loop device is still open elsewhere (ext4 mounted on it), the kernel
// detaches it at its last close; the FUSE connection is aborted so that
// nothing waits on this process, reads through the device fail from then
// on, and the returned error wraps ErrBusy.
func (d *fuseLoopDevice) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	var errs []error
	detachErr := d.loop.detach(context.Background())
	errs = append(errs, detachErr)
	if !d.fuseDown {
		d.fuseDown = true
		d.file.Close()
		// A loop device still in use keeps the FUSE file open: waiting
		// for the mount to become idle would be in vain.
		errs = append(errs, d.stopFUSE(detachErr == nil))
	}
	if d.ownDir {
		if err := os.Remove(d.mountDir); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("device: remove mount directory: %w", err))
		}
	}
	return errors.Join(errs...)
}

// stopFUSE unmounts the FUSE file system and waits for its server to stop.
// A mount that stays busy (the loop device still holds the file) is
// aborted and detached lazily.
func (d *fuseLoopDevice) stopFUSE(wait bool) error {
	err := unmountFUSE(d.mountDir, wait)
	select {
	case <-d.served:
	case <-time.After(serverStopTimeout):
		err = errors.Join(err, fmt.Errorf("device: FUSE server at %s still running %v after unmount", d.mountDir, serverStopTimeout))
	}
	return err
}

// unmountFUSE unmounts the FUSE file system at dir. While the mount is busy
// it retries briefly if wait is set (the loop driver may drop its file
// asynchronously), then
// aborts the connection (MNT_FORCE) and detaches the mount (MNT_DETACH), so
// the caller never waits on whoever holds it; that case returns ErrBusy.
func unmountFUSE(dir string, wait bool) error {
	delay := time.Millisecond
	for deadline := time.Now().Add(time.Second); ; delay = min(2*delay, 50*time.Millisecond) {
		err := unix.Unmount(dir, 0)
		switch {
		case err == nil || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT):
			return nil // unmounted, or not mounted (any more)
		case !errors.Is(err, unix.EBUSY):
			return fmt.Errorf("device: unmount %s: %w", dir, err)
		}
		if !wait || time.Now().After(deadline) {
			break
		}
		time.Sleep(delay)
	}
	// Aborting first means nobody blocks on the dying server; MNT_FORCE
	// itself still fails with EBUSY.
	_ = unix.Unmount(dir, unix.MNT_FORCE)
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("device: lazy unmount of %s: %w", dir, err)
	}
	return fmt.Errorf("%w: FUSE mount %s was still in use; aborted and detached", ErrBusy, dir)
}

// setReadAhead sets the readahead window of the file system mounted at dir
// through its bdi. The FUSE protocol can only lower the kernel's default.
func setReadAhead(dir string, bytes int) error {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return fmt.Errorf("device: stat FUSE mount: %w", err)
	}
	p := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	if err := os.WriteFile(p, []byte(strconv.Itoa(bytes/1024)), 0); err != nil {
		return fmt.Errorf("device: set FUSE readahead: %w", err)
	}
	return nil
}
