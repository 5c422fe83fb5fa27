// Package bpftest gives tests real block devices to capture from: a gate for
// root and kernel features, tmpfs mounts, and loop devices over files on
// them. Everything it creates is undone in the test's Cleanup, pass or fail.
package bpftest

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Require checks what capture tests need: root, kernel BTF and loop devices.
// When something is missing the test fails if CI=true (the CI machine must
// have it) and is skipped with the reason otherwise.
func Require(tb testing.TB) {
	tb.Helper()
	switch {
	case os.Geteuid() != 0:
		missing(tb, "needs root (loop devices, BPF)")
	case !exists("/sys/kernel/btf/vmlinux"):
		missing(tb, "needs kernel BTF (/sys/kernel/btf/vmlinux)")
	case !exists("/dev/loop-control"):
		missing(tb, "needs loop devices (/dev/loop-control)")
	}
}

// RequireTool is Require's counterpart for an external program on PATH.
func RequireTool(tb testing.TB, name string) string {
	tb.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		missing(tb, fmt.Sprintf("needs %s on PATH (scripts/install-deps.sh test)", name))
	}
	return p
}

func missing(tb testing.TB, why string) {
	tb.Helper()
	if os.Getenv("CI") == "true" {
		tb.Fatalf("CI=true but the machine is not fit: %s", why)
	}
	tb.Skipf("skipping: %s", why)
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// Tmpfs mounts a fresh tmpfs of the given size in bytes on a temporary
// directory and returns that directory; Cleanup unmounts it.
func Tmpfs(tb testing.TB, size int64) string {
	tb.Helper()
	dir := tb.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, fmt.Sprintf("size=%d", size)); err != nil {
		tb.Fatalf("mount tmpfs on %s: %v", dir, err)
	}
	tb.Cleanup(func() {
		// Lazy: the loop device may still be letting go of its backing file.
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			tb.Errorf("unmount tmpfs %s: %v", dir, err)
		}
	})
	return dir
}

// Loop is a loop device attached to a backing file.
type Loop struct {
	Path  string // /dev/loopN
	Major uint32
	Minor uint32
	ctl   *os.File // keeps the device configured until Cleanup
}

// NewLoop creates a file of size bytes in dir, filled with a pattern so reads
// return data, and attaches it to a free loop device with direct I/O off.
// Cleanup detaches the device. Should the test process die first, nothing
// stays behind but the (empty) mount: the device is set to clear itself when
// its last descriptor closes, and the backing file is already unlinked.
func NewLoop(tb testing.TB, dir string, size int64) *Loop {
	tb.Helper()
	backing := filepath.Join(dir, fmt.Sprintf("disk-%d.img", time.Now().UnixNano()))
	if err := writePattern(backing, size); err != nil {
		tb.Fatal(err)
	}
	l, err := attach(backing)
	if err != nil {
		tb.Fatal(err)
	}
	if err := os.Remove(backing); err != nil { // the device holds it open
		tb.Error(err)
	}
	tb.Cleanup(func() {
		if err := l.detach(); err != nil {
			tb.Errorf("detach %s: %v", l.Path, err)
		}
	})
	return l
}

func writePattern(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("create backing file: %w", err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	for off := int64(0); off < size; off += int64(len(buf)) {
		n := min(int64(len(buf)), size-off)
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			return fmt.Errorf("fill backing file: %w", err)
		}
	}
	return f.Close()
}

// attach configures a free loop device in one ioctl (LOOP_CONFIGURE),
// retrying when another process grabs the same free device first.
func attach(backing string) (*Loop, error) {
	bf, err := os.OpenFile(backing, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer bf.Close() // the loop device holds its own reference
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer ctl.Close()
	for attempt := 0; attempt < 20; attempt++ {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)
		}
		path := fmt.Sprintf("/dev/loop%d", n)
		dev, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", path, err)
		}
		cfg := unix.LoopConfig{Fd: uint32(bf.Fd()), Info: unix.LoopInfo64{Flags: unix.LO_FLAGS_AUTOCLEAR}}
		copy(cfg.Info.File_name[:], backing)
		err = unix.IoctlLoopConfigure(int(dev.Fd()), &cfg)
		if errors.Is(err, unix.EBUSY) {
			dev.Close()
			continue
		}
		if err != nil {
			dev.Close()
			return nil, fmt.Errorf("LOOP_CONFIGURE %s: %w", path, err)
		}
		var st unix.Stat_t
		if err := unix.Fstat(int(dev.Fd()), &st); err != nil {
			_ = unix.IoctlSetInt(int(dev.Fd()), unix.LOOP_CLR_FD, 0)
			dev.Close()
			return nil, err
		}
		return &Loop{Path: path, Major: unix.Major(st.Rdev), Minor: unix.Minor(st.Rdev), ctl: dev}, nil
	}
	return nil, errors.New("no free loop device after 20 attempts")
}

func (l *Loop) detach() error {
	err := unix.IoctlSetInt(int(l.ctl.Fd()), unix.LOOP_CLR_FD, 0)
	return errors.Join(err, l.ctl.Close())
}

// FlushBuffers drops the device's page cache (BLKFLSBUF), so the next
// buffered read reaches the device.
func (l *Loop) FlushBuffers(tb testing.TB) {
	tb.Helper()
	if err := unix.IoctlSetInt(int(l.ctl.Fd()), unix.BLKFLSBUF, 0); err != nil {
		tb.Fatalf("BLKFLSBUF %s: %v", l.Path, err)
	}
}

// ReadDirect reads n bytes at off with O_DIRECT, which reaches the device as
// one request of exactly that range (for n up to the queue's max_sectors).
func (l *Loop) ReadDirect(tb testing.TB, off, n int64) {
	tb.Helper()
	f, err := os.OpenFile(l.Path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	buf := alignedBuf(int(n))
	if _, err := f.ReadAt(buf, off); err != nil {
		tb.Fatalf("O_DIRECT read of %d bytes at %d on %s: %v", n, off, l.Path, err)
	}
}

// WriteDirect writes n bytes at off with O_DIRECT.
func (l *Loop) WriteDirect(tb testing.TB, off, n int64) {
	tb.Helper()
	f, err := os.OpenFile(l.Path, os.O_WRONLY|unix.O_DIRECT, 0)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(alignedBuf(int(n)), off); err != nil {
		tb.Fatalf("O_DIRECT write of %d bytes at %d on %s: %v", n, off, l.Path, err)
	}
}

// alignedBuf returns n bytes aligned to 4 KiB, as O_DIRECT requires.
func alignedBuf(n int) []byte {
	const align = 4096
	raw := make([]byte, n+align)
	skip := align - int(uintptr(unsafe.Pointer(&raw[0]))%align)
	if skip == align {
		skip = 0
	}
	return raw[skip : skip+n]
}

// BPFObjects returns the IDs of the programs named with prefix, and of the
// links to them, that process pid holds file descriptors for (from
// /proc/PID/fdinfo, so other processes' objects of the same name never
// confuse a test).
func BPFObjects(tb testing.TB, pid int, prefix string) (progs, links []uint32) {
	tb.Helper()
	named := map[uint32]bool{}
	for _, p := range Bpftool(tb, "prog") {
		if strings.HasPrefix(p.Name, prefix) {
			named[p.ID] = true
		}
	}
	dir := fmt.Sprintf("/proc/%d/fdinfo", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		tb.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		info := parseFdinfo(string(b))
		prog, isProg := info["prog_id"]
		if !isProg || !named[prog] {
			continue
		}
		if link, ok := info["link_id"]; ok {
			links = append(links, link)
		} else {
			progs = append(progs, prog)
		}
	}
	return progs, links
}

func parseFdinfo(s string) map[string]uint32 {
	out := map[string]uint32{}
	for _, line := range strings.Split(s, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		if n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32); err == nil {
			out[k] = uint32(n)
		}
	}
	return out
}

// BPFObject is one entry of `bpftool prog -j` or `bpftool link -j`.
type BPFObject struct {
	ID     uint32 `json:"id"`
	Name   string `json:"name"`
	ProgID uint32 `json:"prog_id"`
	Type   string `json:"type"`
	// Set for programs while BPF run-time statistics are enabled.
	RunTimeNs uint64 `json:"run_time_ns"`
	RunCnt    uint64 `json:"run_cnt"`
}

// Bpftool lists the kernel's BPF objects of a kind ("prog", "link").
func Bpftool(tb testing.TB, kind string) []BPFObject {
	tb.Helper()
	bin := RequireTool(tb, "bpftool")
	out, err := exec.Command(bin, "-j", kind, "show").Output()
	if err != nil {
		tb.Fatalf("bpftool %s show: %v", kind, err)
	}
	var objs []BPFObject
	if err := json.Unmarshal(out, &objs); err != nil {
		tb.Fatalf("bpftool %s show: %v: %q", kind, err, out)
	}
	return objs
}

// AssertGone fails the test if any of the given program or link IDs is
// still loaded, or any link still points at one of the programs, after a
// grace period: the kernel frees a closed program asynchronously (deferred
// work after an RCU grace period), though it is detached at once.
func AssertGone(tb testing.TB, progs, links []uint32) {
	tb.Helper()
	var left []string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		left = left[:0]
		for _, p := range Bpftool(tb, "prog") {
			if slices.Contains(progs, p.ID) {
				left = append(left, fmt.Sprintf("program %d (%s) is still loaded", p.ID, p.Name))
			}
		}
		for _, l := range Bpftool(tb, "link") {
			if slices.Contains(links, l.ID) || slices.Contains(progs, l.ProgID) {
				left = append(left, fmt.Sprintf("link %d (%s, program %d) is still attached", l.ID, l.Type, l.ProgID))
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
	}
	for _, msg := range left {
		tb.Error(msg)
	}
}

// Monotonic reads CLOCK_MONOTONIC, the clock of the events' timestamps.
func Monotonic(tb testing.TB) uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		tb.Fatal(err)
	}
	return uint64(ts.Nano())
}

// CgroupID returns the cgroup v2 id of the calling process (the inode of its
// cgroup directory), or false without a cgroup2 mount.
func CgroupID(tb testing.TB) (uint64, bool) {
	tb.Helper()
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return 0, false
	}
	var rel string
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			rel = p
		}
	}
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil || rel == "" {
		return 0, false
	}
	for _, line := range strings.Split(string(mi), "\n") {
		// ... mountpoint ... - fstype source options
		pre, post, ok := strings.Cut(line, " - ")
		if !ok || !strings.HasPrefix(post, "cgroup2 ") {
			continue
		}
		fields := strings.Fields(pre)
		if len(fields) < 5 {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(filepath.Join(fields[4], rel), &st) == nil {
			return st.Ino, true
		}
	}
	return 0, false
}
