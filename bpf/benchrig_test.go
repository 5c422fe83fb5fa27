package bpf_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/bpf"
	"github.com/obdtrace/obdtrace/bpf/bpftest"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/device"
)

// deviceKind is the kind of block device fio reads in a benchmark.
type deviceKind string

const (
	// kindTmpfs is a loop device over a 512 MiB file on tmpfs: the cheapest
	// read there is (~3 µs of CPU), so the capture's cost shows most. The
	// worst case, not what the recorder watches.
	kindTmpfs deviceKind = "tmpfs"
	// kindFUSEWarm is the device the recorder watches: an image served by
	// the backstore's frontend (a loop device over the file of a FUSE mount
	// served by this process), here a 1 GiB in-memory image of random
	// data, read once in full first so fio's reads hit the FUSE file's page
	// cache and never reach the daemon.
	kindFUSEWarm deviceKind = "fuse-warm"
	// kindFUSECold is the same device with the FUSE file's page cache
	// dropped at the start of every segment, as at a container's start-up:
	// most reads reach the daemon.
	kindFUSECold deviceKind = "fuse-cold"
)

// fuseImageSize is the size of the FUSE benchmark image: large enough that
// a cold segment stays mostly cold (fio reads ~10k random 4 KiB blocks a
// second of it there).
const fuseImageSize = 1 << 30

// benchRig is the device fio reads (the target), and another device.
type benchRig struct {
	kind       deviceKind
	fio        string
	path       string // the target's device node
	stat       string // its /sys/dev/block/M:m/stat
	tDev, oDev bpf.Dev
	segment    time.Duration
	// drop, for kindFUSECold, empties the FUSE file's page cache.
	drop func(b *testing.B)
}

func newBenchRig(b *testing.B, kind deviceKind) *benchRig {
	bpftest.Require(b)
	r := &benchRig{kind: kind, fio: bpftest.RequireTool(b, "fio"), segment: time.Second}
	if s := os.Getenv("OBD_BENCH_SEGMENT"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d < 500*time.Millisecond {
			b.Fatalf("OBD_BENCH_SEGMENT=%q: want a duration of at least 500ms", s)
		}
		r.segment = d
	}
	dir := bpftest.Tmpfs(b, 600<<20)
	other := bpftest.NewLoop(b, dir, 16<<20)
	r.oDev = mustDev(b, other.Major, other.Minor)
	switch kind {
	case kindTmpfs:
		target := bpftest.NewLoop(b, dir, 512<<20)
		r.path, r.tDev = target.Path, mustDev(b, target.Major, target.Minor)
	case kindFUSEWarm, kindFUSECold:
		r.attachFUSE(b)
	default:
		b.Fatalf("unknown device kind %q", kind)
	}
	r.stat = fmt.Sprintf("/sys/dev/block/%d:%d/stat", r.tDev.Major(), r.tDev.Minor())
	return r
}

func mustDev(b *testing.B, major, minor uint32) bpf.Dev {
	d, err := bpf.MakeDev(major, minor)
	if err != nil {
		b.Fatal(err)
	}
	return d
}

// attachFUSE attaches an in-memory image of random data with the
// backstore's frontend and its default tuning; a warm rig reads it all
// once, a cold one gets its drop function.
func (r *benchRig) attachFUSE(b *testing.B) {
	data := make([]byte, fuseImageSize)
	rng := rand.NewChaCha8([32]byte{1})
	_, _ = rng.Read(data) // never fails
	mnt := filepath.Join(b.TempDir(), "fuse")
	d, err := device.FUSELoop{}.Attach(context.Background(), device.NewImage(bytes.NewReader(data), fuseImageSize),
		device.Options{MountDir: mnt})
	if err != nil {
		b.Fatalf("attach the FUSE image device: %v", err)
	}
	b.Cleanup(func() {
		if err := d.Close(); err != nil {
			b.Errorf("close the FUSE image device: %v", err)
		}
	})
	major, minor := d.Dev()
	r.path, r.tDev = d.Path(), mustDev(b, major, minor)
	if r.kind == kindFUSEWarm {
		out, err := exec.Command(r.fio, "--name=warm", "--filename="+r.path, "--readonly", "--rw=read", "--bs=1M",
			"--iodepth=8", "--ioengine=io_uring", "--direct=1").CombinedOutput()
		if err != nil {
			b.Fatalf("warm-up read of %s: %v\n%s", r.path, err, out)
		}
		return
	}
	ents, err := os.ReadDir(mnt)
	if err != nil || len(ents) != 1 {
		b.Fatalf("FUSE mount %s: %v, %d entries; want the image file alone", mnt, err, len(ents))
	}
	file := filepath.Join(mnt, ents[0].Name())
	r.drop = func(b *testing.B) {
		f, err := os.Open(file)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
			b.Fatalf("drop the FUSE file's page cache: %v", err)
		}
	}
}

// startFio runs 4k random reads (QD32, direct, io_uring) on the target for
// d, as threads of one process so its CPU time can be read per segment.
func (r *benchRig) startFio(b *testing.B, d time.Duration) *exec.Cmd {
	cmd := exec.Command(r.fio, "--name=bench", "--filename="+r.path, "--readonly", "--thread",
		"--rw=randread", "--bs=4k", "--iodepth=32", "--ioengine=io_uring", "--direct=1",
		"--time_based", fmt.Sprintf("--runtime=%dms", d.Milliseconds()))
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	return cmd
}

// sample is a snapshot of exact counters: the kernel's count of reads
// completed on the target, and the scheduler CPU time (not ticks) of fio's
// threads, of this whole process (the FUSE daemon, for FUSE devices, and the
// reader) and of the capture's reader thread.
type sample struct {
	at        time.Time
	reads     uint64
	fioCPU    time.Duration
	procCPU   time.Duration
	readerCPU time.Duration
	events    int64
}

func (r *benchRig) sample(b *testing.B, fioPid, readerTid int, events int64) sample {
	stat, err := os.ReadFile(r.stat)
	if err != nil {
		b.Fatal(err)
	}
	f := strings.Fields(string(stat))
	reads, err := strconv.ParseUint(f[0], 10, 64)
	if err != nil {
		b.Fatalf("block stat %q: %v", stat, err)
	}
	s := sample{at: time.Now(), reads: reads, fioCPU: threadsCPU(b, fioPid), procCPU: rusage(b), events: events}
	if readerTid != 0 {
		s.readerCPU = taskCPU(fmt.Sprintf("/proc/self/task/%d/schedstat", readerTid))
	}
	return s
}

// threadsCPU sums sum_exec_runtime over a process's threads.
func threadsCPU(b *testing.B, pid int) time.Duration {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	if err != nil || len(tasks) == 0 {
		b.Fatalf("fio's threads: %v", err)
	}
	var sum time.Duration
	for _, t := range tasks {
		sum += taskCPU(t)
	}
	return sum
}

// taskCPU reads a thread's sum_exec_runtime; 0 if it just ended.
func taskCPU(schedstat string) time.Duration {
	s, err := os.ReadFile(schedstat)
	if err != nil {
		return 0
	}
	ns, _ := strconv.ParseInt(strings.Fields(string(s))[0], 10, 64)
	return time.Duration(ns)
}

func rusage(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
