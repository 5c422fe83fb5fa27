package device

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const (
	loopControlPath = "/dev/loop-control"
	sysBlock        = "/sys/block"
	// loopChangeFD is LOOP_CHANGE_FD from <linux/loop.h>, which x/sys/unix
	// does not define.
	loopChangeFD = 0x4C06
	// configureAttempts bounds the race with other processes taking the
	// free loop device between LOOP_CTL_GET_FREE and LOOP_CONFIGURE.
	configureAttempts = 16
)

// loopConfig is what a loop device is configured with.
type loopConfig struct {
	readOnly  bool
	directIO  bool
	blockSize uint32
}

// loopDev is a configured loop device and the descriptor this process keeps
// open on it. The device is set to clear itself at its last close, so it
// disappears with this descriptor unless something (a mount) still holds it.
type loopDev struct {
	num  int
	path string
	fd   *os.File // read-only: holding a writer open would block mounts on kernels that restrict it
	rdev uint64
}

// attachLoop binds backing to a free loop device.
func attachLoop(ctx context.Context, backing *os.File, cfg loopConfig) (*loopDev, error) {
	ctl, err := os.OpenFile(loopControlPath, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("device: open %s: %w", loopControlPath, err)
	}
	defer ctl.Close()
	for range configureAttempts {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		num, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("device: LOOP_CTL_GET_FREE: %w", err)
		}
		dev, err := configureLoop(num, backing, cfg)
		if errors.Is(err, unix.EBUSY) {
			continue // another process took it first
		}
		return dev, err
	}
	return nil, fmt.Errorf("device: no free loop device after %d attempts: %w", configureAttempts, unix.EBUSY)
}

func configureLoop(num int, backing *os.File, cfg loopConfig) (*loopDev, error) {
	path := "/dev/loop" + strconv.Itoa(num)
	mode := os.O_RDWR
	if cfg.readOnly {
		mode = os.O_RDONLY
	}
	f, err := os.OpenFile(path, mode|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("device: open %s: %w", path, err)
	}
	defer f.Close()
	conf := unix.LoopConfig{Fd: uint32(backing.Fd()), Size: cfg.blockSize}
	conf.Info.Flags = unix.LO_FLAGS_AUTOCLEAR
	if cfg.readOnly {
		conf.Info.Flags |= unix.LO_FLAGS_READ_ONLY
	}
	if cfg.directIO {
		conf.Info.Flags |= unix.LO_FLAGS_DIRECT_IO
	}
	copy(conf.Info.File_name[:len(conf.Info.File_name)-1], backing.Name())
	if err := unix.IoctlLoopConfigure(int(f.Fd()), &conf); err != nil {
		return nil, fmt.Errorf("device: LOOP_CONFIGURE %s: %w", path, err)
	}
	// Keep a read-only descriptor: it holds the device (autoclear acts at
	// the last close) without counting as a writer.
	keep, err := os.OpenFile(path, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0)
		return nil, fmt.Errorf("device: reopen %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(keep.Fd()), &st); err != nil {
		keep.Close()
		return nil, fmt.Errorf("device: stat %s: %w", path, err)
	}
	return &loopDev{num: num, path: path, fd: keep, rdev: st.Rdev}, nil
}

// name is the device's name in /sys/block.
func (l *loopDev) name() string { return "loop" + strconv.Itoa(l.num) }

// claim opens the device exclusively (O_EXCL), which fails with ErrBusy
// while a file system is mounted on it and keeps one from being mounted
// until the returned file is closed.
func (l *loopDev) claim() (*os.File, error) {
	f, err := os.OpenFile(l.path, os.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.EBUSY) {
		return nil, fmt.Errorf("%w: %s is claimed by a mounted file system, which this kernel would shut down on a change of the loop file", ErrBusy, l.path)
	}
	if err != nil {
		return nil, fmt.Errorf("device: claim %s: %w", l.path, err)
	}
	return f, nil
}

// changeFD moves the read-only device onto f (LOOP_CHANGE_FD) through dev,
// a descriptor of the device. The kernel freezes the queue, so requests in
// flight finish on the old file first.
func (l *loopDev) changeFD(dev, f *os.File) error {
	if err := unix.IoctlSetInt(int(dev.Fd()), loopChangeFD, int(f.Fd())); err != nil {
		return fmt.Errorf("device: LOOP_CHANGE_FD %s to %s: %w", l.path, f.Name(), err)
	}
	return nil
}

func (l *loopDev) setDirectIO(on bool) error {
	v := 0
	if on {
		v = 1
	}
	if err := unix.IoctlSetInt(int(l.fd.Fd()), unix.LOOP_SET_DIRECT_IO, v); err != nil {
		return fmt.Errorf("device: LOOP_SET_DIRECT_IO %s: %w", l.path, err)
	}
	return nil
}

// detach asks the kernel to clear the device and closes this process's
// descriptor. If someone else holds the device, the kernel defers the clear
// to their last close and ErrBusy is returned.
func (l *loopDev) detach(ctx context.Context) error {
	// With autoclear set, LOOP_CLR_FD only marks the device for rundown;
	// the clear itself happens when the last descriptor closes.
	err := unix.IoctlSetInt(int(l.fd.Fd()), unix.LOOP_CLR_FD, 0)
	if cerr := l.fd.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("device: close %s: %w", l.path, cerr)
	}
	if err != nil && !errors.Is(err, unix.ENXIO) { // ENXIO: already unbound
		return fmt.Errorf("device: LOOP_CLR_FD %s: %w", l.path, err)
	}
	if waitUnbound(ctx, l.name(), time.Second) {
		return nil
	}
	return fmt.Errorf("%w: %s is still open elsewhere (mounted?); it detaches at its last close", ErrBusy, l.path)
}

// waitUnbound polls until /sys/block/<name> shows no backing file, for at
// most timeout.
func waitUnbound(ctx context.Context, name string, timeout time.Duration) bool {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if _, ok := backingFile(name); !ok {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-tick.C:
		}
	}
}

// backingFile is the path of the file bound to loop device name, as the
// kernel reports it, and whether one is bound.
func backingFile(name string) (string, bool) {
	b, err := os.ReadFile(filepath.Join(sysBlock, name, "loop", "backing_file"))
	if err != nil {
		return "", false
	}
	return strings.TrimSuffix(string(b), "\n"), true
}

// boundLoops lists the bound loop devices and their backing files.
func boundLoops() (map[string]string, error) {
	names, err := filepath.Glob(filepath.Join(sysBlock, "loop*"))
	if err != nil {
		return nil, err
	}
	out := make(map[string]string)
	for _, p := range names {
		name := filepath.Base(p)
		if b, ok := backingFile(name); ok {
			out[name] = b
		}
	}
	return out, nil
}

// loopBackingDev is the device number of the file system holding loop
// device name's backing file (LOOP_GET_STATUS64 lo_device).
func loopBackingDev(name string) (uint64, error) {
	f, err := os.OpenFile("/dev/"+name, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	if err != nil {
		return 0, fmt.Errorf("device: LOOP_GET_STATUS64 /dev/%s: %w", name, err)
	}
	return info.Device, nil
}

// clearLoop detaches loop device name, which this process may not have
// opened before; see loopDev.detach.
func clearLoop(ctx context.Context, name string) error {
	f, err := os.OpenFile("/dev/"+name, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("device: open /dev/%s: %w", name, err)
	}
	l := &loopDev{path: "/dev/" + name, fd: f}
	l.num, _ = strconv.Atoi(strings.TrimPrefix(name, "loop"))
	return l.detach(ctx)
}
