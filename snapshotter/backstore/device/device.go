// Package device owns the block device frontend of the backstore: it exposes
// an image (a virtual disk readable at random, optionally writable) as a
// kernel block device that ext4 can be mounted on, and tears it down again,
// including after the serving process was killed.
//
// The kernel this project targets has loop devices and FUSE but no ublk, TCMU
// or NBD, so the one Frontend here, FUSELoop, serves the image as a single
// regular file in a private FUSE mount and binds a loop device to that file.
// Other frontends implement the same Frontend and Device interfaces.
//
// Why the defaults are what they are (loop buffered I/O over the FUSE
// file's page cache, so warm reads never reach the daemon; FUSE passthrough
// for images that are a local file) is measured in docs/device.md.
package device

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/rs/zerolog"
)

// Sentinel errors; callers match them with errors.Is.
var (
	// ErrBusy reports a device still opened by someone else (ext4 mounted on
	// it, typically) when it was closed or detached: the teardown went as far
	// as it could and the rest is deferred to the last close.
	ErrBusy = errors.New("device: in use")
	// ErrNotWritable is returned when a writable device is asked for an image
	// that cannot be written.
	ErrNotWritable = errors.New("device: image is not writable")
	// ErrUnsupported is returned for an operation the device cannot do in its
	// current mode (switching a writable device to a file, for example).
	ErrUnsupported = errors.New("device: operation not supported")
	// ErrClosed is returned by a Device used after Close.
	ErrClosed = errors.New("device: closed")
	// ErrSize is returned when sizes disagree or are unusable.
	ErrSize = errors.New("device: bad size")
	// ErrOutOfRange is returned for I/O beyond an image's size.
	ErrOutOfRange = errors.New("device: I/O beyond the end of the image")
)

// Image is a virtual disk: Size bytes readable at any offset. ReadAt must be
// safe for concurrent use; the kernel issues many reads at once.
type Image interface {
	io.ReaderAt
	Size() int64
}

// WritableImage is an Image the device may write to, as the converter needs
// when it formats and fills a new layer. Discard makes a range read as zeros;
// Sync makes every completed write durable (the device's flush).
type WritableImage interface {
	Image
	io.WriterAt
	Discard(off, n int64) error
	Sync() error
}

// LocalFile is implemented by images that are a plain local file holding the
// disk byte for byte. Frontends may then let the kernel read that file
// directly (FUSE passthrough) instead of going through the image's ReadAt.
type LocalFile interface {
	Image
	File() *os.File
}

// Frontend turns images into block devices.
type Frontend interface {
	// Attach exposes img as a block device. The image must stay usable until
	// the device is closed.
	Attach(ctx context.Context, img Image, opts Options) (Device, error)
}

// Device is an attached image.
type Device interface {
	// Path is the device node, such as /dev/loop5.
	Path() string
	// Dev is the device number, as the eBPF recorder filters on.
	Dev() (major, minor uint32)
	// SwitchToFile moves a read-only device onto the local file at path,
	// which must hold exactly the image's bytes; the image is no longer
	// read afterwards. Frontends that cannot do it under a mounted file
	// system (FUSELoop on this kernel) return ErrBusy then.
	SwitchToFile(ctx context.Context, path string) error
	// Close detaches the device and releases everything behind it. If the
	// device is still in use it tears down what it can, makes the rest
	// happen at the last close, and returns an error wrapping ErrBusy.
	Close() error
}

// ReadAheadLimiter is implemented by devices that read ahead below the
// block device (FUSELoop: the loop driver reads the FUSE file through its
// page cache, with the file's own readahead). What that readahead reads
// past the block device's requests is fetched like any read, yet no block
// trace sees it: while a trace replay runs, those bytes are demand fetches
// the plan does not know, on the link ahead of the plan's. While the limit
// is on, the image is read for what the block device is asked and no more.
type ReadAheadLimiter interface {
	LimitReadAhead(on bool) error
}

// Options choose how an image is attached.
type Options struct {
	// Writable attaches the image read-write; it must be a WritableImage.
	Writable bool
	// MountDir is an empty directory for the frontend's private mounts. If
	// empty, a private directory is made under os.TempDir() and removed on
	// Close. A directory given here is what Cleanup takes after a crash.
	MountDir string
	// Tuning overrides the measured defaults (DefaultTuning) when non-nil.
	Tuning *Tuning
	// Logger receives the frontend's diagnostics; the zero value drops them.
	Logger zerolog.Logger
}

// Tuning holds the performance levers of the FUSE+loop frontend. The
// defaults are what measured best here; docs/device.md has the figures.
type Tuning struct {
	// LoopDirectIO makes the loop driver read its backing file with
	// O_DIRECT. Off, loop reads the FUSE file through its page cache, so warm
	// reads never reach the daemon.
	LoopDirectIO bool
	// LoopBlockSize is the loop device's logical block size (512 or 4096).
	LoopBlockSize uint32
	// KeepCache keeps the FUSE file's page cache across opens
	// (FOPEN_KEEP_CACHE).
	KeepCache bool
	// CacheTimeout is how long the kernel may trust the file's attributes
	// and directory entry without asking the daemon again.
	CacheTimeout time.Duration
	// MaxRead is the largest FUSE read or write request, in bytes.
	MaxRead int
	// ReadAhead is the FUSE file's largest readahead window in bytes (its
	// bdi's read_ahead_kb); 0 keeps the kernel's 128 KiB. Buffered reads
	// that miss the cache reach the daemon in requests of at most this
	// size; the kernel widens the window only for sequential readers.
	ReadAhead int
	// SyncRead turns off FUSE's asynchronous reads (one read in flight per
	// handle).
	SyncRead bool
	// Passthrough lets the kernel read a LocalFile image directly (FUSE
	// passthrough) instead of asking the daemon.
	Passthrough bool
	// SwitchDirectIO turns on loop direct I/O after SwitchToFile, so the
	// local file's data is not cached twice (by the file and above loop).
	SwitchDirectIO bool
}

// DefaultTuning is the configuration measured best on this kernel (see
// docs/device.md).
func DefaultTuning() Tuning {
	return Tuning{
		LoopDirectIO:  false,
		LoopBlockSize: 4096,
		KeepCache:     true,
		CacheTimeout:  24 * time.Hour,
		MaxRead:       1 << 20,
		// The kernel's 128 KiB, not 1 MiB: the FUSE file's readahead is
		// below the loop device, so on a cold image every byte it reads
		// past the application's is a registry fetch no trace knows of
		// (a cold python3 start through 25 Mbit/s: 2-4 MB more, 5-7 %
		// slower with replay). Warm sequential reads, from the FUSE page
		// cache, do not change; cold ones from a cached blob are slower
		// (docs/benchmarks.md, cold start).
		ReadAhead:   128 << 10,
		Passthrough: true,
	}
}

// MaxReadAheadKB bounds a configured readahead (WithReadAhead): a FUSE
// request is at most 1 MiB (Tuning.MaxRead), and more than 16 of them
// ahead of a reader only queue.
const MaxReadAheadKB = 16 << 10

// WithReadAhead returns DefaultTuning with the FUSE file's readahead set to
// kb KiB, or nil (the defaults) for 0. kb must be a multiple of 4 up to
// MaxReadAheadKB. More readahead reads a cached image's data in larger
// requests (cold sequential reads: 0.28x of one GET with 1 MiB against
// 0.15x with 128 KiB); over a slow link it fetches bytes the reader may
// not need.
func WithReadAhead(kb int) (*Tuning, error) {
	if kb < 0 || kb > MaxReadAheadKB || kb%4 != 0 {
		return nil, fmt.Errorf("readahead of %d KiB: want a multiple of 4 from 0 (the default, %d) to %d", kb, DefaultTuning().ReadAhead>>10, MaxReadAheadKB)
	}
	if kb == 0 {
		return nil, nil
	}
	t := DefaultTuning()
	t.ReadAhead = kb << 10
	return &t, nil
}

func (o Options) tuning() Tuning {
	if o.Tuning != nil {
		return *o.Tuning
	}
	return DefaultTuning()
}
