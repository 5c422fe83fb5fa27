package bpf_test

import (
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/obdtrace/obdtrace/bpf"
	"github.com/obdtrace/obdtrace/bpf/bpftest"
	"golang.org/x/sys/unix"
)

// rig is two loop devices on a private tmpfs: a to capture, b as a
// neighbour whose requests must never show up.
type rig struct {
	a, b       *bpftest.Loop
	devA, devB bpf.Dev
}

func newRig(t *testing.T) *rig {
	t.Helper()
	bpftest.Require(t)
	dir := bpftest.Tmpfs(t, 64<<20)
	r := &rig{a: bpftest.NewLoop(t, dir, 16<<20), b: bpftest.NewLoop(t, dir, 16<<20)}
	r.devA = devOf(t, r.a)
	r.devB = devOf(t, r.b)
	return r
}

func devOf(t *testing.T, l *bpftest.Loop) bpf.Dev {
	t.Helper()
	d, err := bpf.MakeDev(l.Major, l.Minor)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func open(t *testing.T, opts bpf.Options) *bpf.Capture {
	t.Helper()
	c, err := bpf.Open(opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return c
}

// drain detaches c and returns every event it still holds.
func drain(t *testing.T, c *bpf.Capture) []bpf.Event {
	t.Helper()
	if err := c.Detach(); err != nil {
		t.Fatalf("Detach: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var evs []bpf.Event
	for {
		var ev bpf.Event
		err := c.Read(ctx, &ev)
		if errors.Is(err, io.EOF) {
			return evs
		}
		if err != nil {
			t.Fatalf("Read after %d events: %v", len(evs), err)
		}
		evs = append(evs, ev)
	}
}

type span struct{ off, n int64 }

func selfComm(t *testing.T) string {
	b, err := os.ReadFile("/proc/self/comm")
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// checkExactReads asserts evs are exactly the reads of want on dev, in
// order, issued by this process within [before, after].
func checkExactReads(t *testing.T, evs []bpf.Event, dev bpf.Dev, want []span, before, after uint64) {
	t.Helper()
	if len(evs) != len(want) {
		for _, ev := range evs {
			t.Logf("got %s %s sector %d+%d %s pid %d %s", ev.Kind, ev.Dev, ev.Sector, ev.Sectors, ev.Op, ev.PID, ev.CommString())
		}
		t.Fatalf("got %d events, want %d", len(evs), len(want))
	}
	comm := selfComm(t)
	cgroup, haveCgroup := bpftest.CgroupID(t)
	prev := before
	for i, ev := range evs {
		w := want[i]
		if ev.Kind != bpf.KindIssue || ev.Dev != dev || ev.Sector != uint64(w.off/512) || ev.Sectors != uint32(w.n/512) {
			t.Errorf("event %d: %s on %s sector %d+%d, want issue on %s sector %d+%d",
				i, ev.Kind, ev.Dev, ev.Sector, ev.Sectors, dev, w.off/512, w.n/512)
		}
		if ev.Op&bpf.OpRead == 0 || ev.Op&bpf.OpWrite != 0 {
			t.Errorf("event %d: op %s, want a read", i, ev.Op)
		}
		if ev.PID != uint32(os.Getpid()) || ev.CommString() != comm {
			t.Errorf("event %d: issuer %d %q, want %d %q", i, ev.PID, ev.CommString(), os.Getpid(), comm)
		}
		if haveCgroup && ev.CgroupID != cgroup {
			t.Errorf("event %d: cgroup id %d, want %d", i, ev.CgroupID, cgroup)
		}
		if ev.Timestamp < prev || ev.Timestamp > after {
			t.Errorf("event %d: timestamp %d outside [%d, %d] (previous event or start, end)", i, ev.Timestamp, prev, after)
		}
		prev = ev.Timestamp
	}
}

// exactReads does O_DIRECT reads at known places on a, interleaved with reads
// on b and writes on a that must not be reported, and checks what came out.
func exactReads(t *testing.T, mode bpf.AttachMode) {
	r := newRig(t)
	c := open(t, bpf.Options{Devices: []bpf.Dev{r.devA}, Attach: mode})
	if mode != bpf.AttachAuto && c.Mode() != mode {
		t.Fatalf("Mode() = %s, want %s", c.Mode(), mode)
	}
	want := []span{{0, 4096}, {1 << 20, 64 << 10}, {8192, 512}, {3<<20 + 4096, 128 << 10}, {7 * 512, 1024}, {15 << 20, 4096}}
	before := bpftest.Monotonic(t)
	for i, s := range want {
		r.a.ReadDirect(t, s.off, s.n)
		r.b.ReadDirect(t, s.off, s.n)            // other device: not reported
		r.a.WriteDirect(t, int64(i+1)<<20, 4096) // write: not reported by default
	}
	after := bpftest.Monotonic(t)
	checkExactReads(t, drain(t, c), r.devA, want, before, after)
}

func TestExactSectors(t *testing.T) { exactReads(t, bpf.AttachAuto) }

func TestExactSectorsClassicTracepoint(t *testing.T) {
	bpftest.Require(t)
	mountTracefs(t)
	exactReads(t, bpf.AttachTracepoint)
}

// mountTracefs makes the classic tracepoints usable, undoing it afterwards
// if it was not mounted before.
func mountTracefs(t *testing.T) {
	const root = "/sys/kernel/tracing"
	if _, err := os.Stat(root + "/events/block/block_rq_issue/id"); err == nil {
		return
	}
	if err := unix.Mount("nodev", root, "tracefs", 0, ""); err != nil {
		t.Fatalf("mount tracefs on %s: %v", root, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(root, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", root, err)
		}
	})
}

func TestIncludeWrites(t *testing.T) {
	r := newRig(t)
	c := open(t, bpf.Options{Devices: []bpf.Dev{r.devA}, IncludeWrites: true})
	r.a.WriteDirect(t, 1<<20, 8192)
	r.a.ReadDirect(t, 2<<20, 4096)
	evs := drain(t, c)
	if len(evs) != 2 {
		t.Fatalf("got %d events, want a write and a read", len(evs))
	}
	if w := evs[0]; w.Op&bpf.OpWrite == 0 || w.Op&bpf.OpRead != 0 || w.Sector != 2048 || w.Sectors != 16 {
		t.Errorf("first event %s sector %d+%d, want write of sector 2048+16", w.Op, w.Sector, w.Sectors)
	}
	if rd := evs[1]; rd.Op&bpf.OpRead == 0 || rd.Sector != 4096 || rd.Sectors != 8 {
		t.Errorf("second event %s sector %d+%d, want read of sector 4096+8", rd.Op, rd.Sector, rd.Sectors)
	}
}

func TestBufferedReadsShowReadahead(t *testing.T) {
	r := newRig(t)
	c := open(t, bpf.Options{Devices: []bpf.Dev{r.devA}})
	r.a.FlushBuffers(t)
	f, err := os.Open(r.a.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const off = 4 << 20
	if _, err := f.ReadAt(make([]byte, 4096), off); err != nil {
		t.Fatal(err)
	}
	evs := drain(t, c)
	covered, ahead := false, 0
	for _, ev := range evs {
		if ev.Op&bpf.OpRead == 0 || ev.Dev != r.devA {
			t.Errorf("unexpected event %s on %s", ev.Op, ev.Dev)
		}
		if ev.Op&bpf.OpReadahead != 0 {
			ahead++
		}
		if ev.Sector <= off/512 && ev.Sector+uint64(ev.Sectors) >= off/512+8 {
			covered = true
		}
	}
	if !covered || ahead == 0 {
		t.Fatalf("%d events, %d readahead, covering sector %d: %v; want readahead covering the page read",
			len(evs), ahead, off/512, covered)
	}
}

func TestAddRemoveWhileRunning(t *testing.T) {
	r := newRig(t)
	c := open(t, bpf.Options{})
	r.a.ReadDirect(t, 0, 4096) // not in the set yet
	if err := c.AddDevice(r.devA); err != nil {
		t.Fatal(err)
	}
	if devs, err := c.Devices(); err != nil || len(devs) != 1 || devs[0] != r.devA {
		t.Fatalf("Devices() = %v, %v; want [%s]", devs, err, r.devA)
	}
	before := bpftest.Monotonic(t)
	r.a.ReadDirect(t, 1<<20, 4096)
	after := bpftest.Monotonic(t)
	if err := c.RemoveDevice(r.devA); err != nil {
		t.Fatal(err)
	}
	if err := c.RemoveDevice(r.devA); err != nil {
		t.Fatalf("removing twice: %v", err)
	}
	r.a.ReadDirect(t, 2<<20, 4096) // removed again
	checkExactReads(t, drain(t, c), r.devA, []span{{1 << 20, 4096}}, before, after)
}

func TestCompletionLatency(t *testing.T) {
	r := newRig(t)
	c := open(t, bpf.Options{Devices: []bpf.Dev{r.devA}, Completion: true})
	r.a.ReadDirect(t, 5<<20, 16<<10)
	evs := drain(t, c)
	if len(evs) != 2 || evs[0].Kind != bpf.KindIssue || evs[1].Kind != bpf.KindComplete {
		t.Fatalf("got %d events %v, want an issue then a completion", len(evs), evs)
	}
	issue, done := evs[0], evs[1]
	if done.Sector != issue.Sector || done.Sectors != issue.Sectors || done.Dev != issue.Dev || done.Op&bpf.OpRead == 0 {
		t.Errorf("completion %s %d+%d %s does not match issue %s %d+%d", done.Dev, done.Sector, done.Sectors, done.Op,
			issue.Dev, issue.Sector, issue.Sectors)
	}
	if done.Latency <= 0 || uint64(done.Latency) != done.Timestamp-issue.Timestamp || done.Status != 0 {
		t.Errorf("latency %v status %d; want %v (completion minus issue time), status 0",
			done.Latency, done.Status, time.Duration(done.Timestamp-issue.Timestamp))
	}
}

// A one-page ring overflows after a few dozen events: every request must then
// be either delivered or counted as lost.
func TestLostCounter(t *testing.T) {
	r := newRig(t)
	c := open(t, bpf.Options{Devices: []bpf.Dev{r.devA}, RingSize: os.Getpagesize(), MaxDelay: time.Hour})
	const reads = 300
	for i := range reads {
		r.a.ReadDirect(t, int64(i)*4096, 4096)
	}
	lost, err := c.Lost()
	if err != nil {
		t.Fatal(err)
	}
	got := len(drain(t, c))
	if lost == 0 || uint64(got)+lost != reads {
		t.Fatalf("%d delivered + %d lost, want %d in all with some lost", got, lost, reads)
	}
	if after, err := c.Lost(); err != nil || after != lost {
		t.Fatalf("Lost() after Detach = %d, %v; want %d", after, err, lost)
	}
}

func TestCloseDetachesEverything(t *testing.T) {
	r := newRig(t)
	c, err := bpf.Open(bpf.Options{Devices: []bpf.Dev{r.devA}, Completion: true})
	if err != nil {
		t.Fatal(err)
	}
	progs, links := bpftest.BPFObjects(t, os.Getpid(), "obd_")
	// Issue and completion hooks, attached, and the flush program, run by
	// the reader but never attached.
	if len(progs) != 3 || len(links) != 2 {
		c.Close()
		t.Fatalf("while open: programs %v, links %v; want 3 programs and 2 links", progs, links)
	}
	readErr := make(chan error, 1)
	go func() { readErr <- c.Read(context.Background(), new(bpf.Event)) }()
	time.Sleep(50 * time.Millisecond) // let Read block
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case err := <-readErr:
		if !errors.Is(err, bpf.ErrClosed) {
			t.Errorf("blocked Read returned %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not interrupt a blocked Read")
	}
	bpftest.AssertGone(t, progs, links)
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := c.AddDevice(r.devB); !errors.Is(err, bpf.ErrClosed) {
		t.Errorf("AddDevice after Close: %v, want ErrClosed", err)
	}
	if _, err := c.Lost(); !errors.Is(err, bpf.ErrClosed) {
		t.Errorf("Lost after Close: %v, want ErrClosed", err)
	}
}

func TestReadHonoursContext(t *testing.T) {
	r := newRig(t)
	c := open(t, bpf.Options{Devices: []bpf.Dev{r.devA}, MaxDelay: -1}) // block in epoll without timeout
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := c.Read(ctx, new(bpf.Event))
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 5*time.Second {
		t.Fatalf("Read on an idle device: %v after %v, want DeadlineExceeded after ~100ms", err, time.Since(start))
	}
	// The wake-up must not leave a stale state behind: the next event is read.
	r.a.ReadDirect(t, 0, 4096)
	ctx2, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel2()
	var ev bpf.Event
	if err := c.Read(ctx2, &ev); err != nil || ev.Sector != 0 || ev.Sectors != 8 {
		t.Fatalf("Read after a cancelled Read: %v, sector %d+%d", err, ev.Sector, ev.Sectors)
	}
}

func TestOpenErrors(t *testing.T) {
	if _, err := bpf.Open(bpf.Options{RingSize: 12345}); !errors.Is(err, bpf.ErrBadRingSize) {
		t.Errorf("RingSize 12345: %v, want ErrBadRingSize", err)
	}
	bpftest.Require(t)
	c, err := bpf.Open(bpf.Options{Attach: bpf.AttachTracepoint})
	if err == nil {
		c.Close()
		t.Skip("tracefs is mounted, so the classic tracepoint exists: no error to check")
	}
	if !errors.Is(err, bpf.ErrNoTracepoint) || !strings.Contains(err.Error(), "tracefs") {
		t.Errorf("classic tracepoint without tracefs: %v, want ErrNoTracepoint naming tracefs", err)
	}
}
