package bpf_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/bpf"
	"github.com/obdtrace/obdtrace/bpf/bpftest"
	"github.com/obdtrace/obdtrace/bpf/jsonl"
)

// benchRig is a target loop device with fio's data, and another device.
type benchRig struct {
	fio        string
	target     *bpftest.Loop
	tDev, oDev bpf.Dev
	segment    time.Duration
}

func newBenchRig(b *testing.B) *benchRig {
	bpftest.Require(b)
	r := &benchRig{fio: bpftest.RequireTool(b, "fio"), segment: time.Second}
	if s := os.Getenv("OBD_BENCH_SEGMENT"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d < 500*time.Millisecond {
			b.Fatalf("OBD_BENCH_SEGMENT=%q: want a duration of at least 500ms", s)
		}
		r.segment = d
	}
	dir := bpftest.Tmpfs(b, 600<<20)
	r.target = bpftest.NewLoop(b, dir, 512<<20)
	other := bpftest.NewLoop(b, dir, 16<<20)
	r.tDev, _ = bpf.MakeDev(r.target.Major, r.target.Minor)
	r.oDev, _ = bpf.MakeDev(other.Major, other.Minor)
	return r
}

// startFio runs 4k random reads (QD32, direct, io_uring) on the target for
// d, as threads of one process so its CPU time can be read per segment.
func (r *benchRig) startFio(b *testing.B, d time.Duration) *exec.Cmd {
	cmd := exec.Command(r.fio, "--name=bench", "--filename="+r.target.Path, "--thread",
		"--rw=randread", "--bs=4k", "--iodepth=32", "--ioengine=io_uring", "--direct=1",
		"--time_based", fmt.Sprintf("--runtime=%dms", d.Milliseconds()))
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	return cmd
}

type mode int

const (
	modeOff mode = iota
	modeTarget
	modeOther
)

// sample is a snapshot of exact counters: the kernel's count of reads
// completed on the target, and the CPU time fio and this process have used
// (scheduler nanoseconds, not ticks).
type sample struct {
	at     time.Time
	reads  uint64
	fioCPU time.Duration
	ownCPU time.Duration
	events int64
}

func (r *benchRig) sample(b *testing.B, fioPid int, events int64) sample {
	stat, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/stat", r.target.Minor))
	if err != nil {
		b.Fatal(err)
	}
	f := strings.Fields(string(stat))
	reads, err := strconv.ParseUint(f[0], 10, 64)
	if err != nil {
		b.Fatalf("block stat %q: %v", stat, err)
	}
	return sample{at: time.Now(), reads: reads, fioCPU: threadsCPU(b, fioPid), ownCPU: rusage(b), events: events}
}

// threadsCPU sums sum_exec_runtime over a process's threads.
func threadsCPU(b *testing.B, pid int) time.Duration {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	if err != nil || len(tasks) == 0 {
		b.Fatalf("fio's threads: %v", err)
	}
	var sum time.Duration
	for _, t := range tasks {
		s, err := os.ReadFile(t)
		if err != nil {
			continue // a thread that just ended
		}
		ns, _ := strconv.ParseInt(strings.Fields(string(s))[0], 10, 64)
		sum += time.Duration(ns)
	}
	return sum
}

// segment is the middle of a span spent in one mode.
type segment struct {
	mode mode
	a, b sample
}

func (s segment) iops() float64 { return float64(s.b.reads-s.a.reads) / s.b.at.Sub(s.a.at).Seconds() }

// cpuPerIO is the CPU fio and the capture spent per read.
func (s segment) cpuPerIO() (fio, capture float64) {
	n := float64(s.b.reads - s.a.reads)
	return float64(s.b.fioCPU-s.a.fioCPU) / n, float64(s.b.ownCPU-s.a.ownCPU) / n
}

// toggler switches one capture between off, on the target device and on
// the other device only, with a reader encoding every event as JSON.
type toggler struct {
	r      *benchRig
	c      *bpf.Capture
	done   chan error
	events atomic.Int64
	lost   uint64
}

func (t *toggler) set(b *testing.B, m mode) {
	switch {
	case m == modeOff && t.c != nil:
		if err := t.c.Detach(); err != nil {
			b.Fatal(err)
		}
		if err := <-t.done; err != nil {
			b.Fatal(err)
		}
		lost, err := t.c.Lost()
		if err != nil {
			b.Fatal(err)
		}
		t.lost += lost
		t.c.Close()
		t.c = nil
	case m != modeOff && t.c == nil:
		c, err := bpf.Open(bpf.Options{})
		if err != nil {
			b.Fatal(err)
		}
		t.c, t.done = c, make(chan error, 1)
		go func() { t.done <- t.read(c) }()
	}
	if t.c == nil {
		return
	}
	on, off := t.r.tDev, t.r.oDev
	if m == modeOther {
		on, off = off, on
	}
	if err := t.c.RemoveDevice(off); err != nil {
		b.Fatal(err)
	}
	if err := t.c.AddDevice(on); err != nil {
		b.Fatal(err)
	}
}

// read is what obd-recorder capture does with each event, minus the file.
func (t *toggler) read(c *bpf.Capture) error {
	w := jsonl.NewWriter(io.Discard)
	var ev bpf.Event
	for {
		err := c.Read(context.Background(), &ev)
		if err == io.EOF {
			return w.Flush()
		}
		if err != nil {
			return err
		}
		if err := w.Write(&ev); err != nil {
			return err
		}
		t.events.Add(1)
	}
}

// BenchmarkCaptureOverhead measures what capture costs fio's 4k random reads
// (QD32, direct, io_uring) on a tmpfs-backed loop device. One fio run lasts
// the whole benchmark while capture cycles through three modes, a segment
// each (OBD_BENCH_SEGMENT, default 1s), rotating the order every cycle: off,
// on the fio device, and on another device only. Adjacent seconds of one
// run share most of a shared machine's noise, which separate runs do not.
// Each segment is measured over its middle 60% with exact counters: reads
// completed (/sys/block/loopN/stat) and scheduler CPU time of fio's threads
// and of this process. One b.N iteration is one cycle. Reported, as
// medians over cycles:
//
//   - ratio_target, ratio_other: IOPS in the mode / IOPS with capture off,
//     with quartiles (target_q1, target_q3, ...) as a measure of the noise;
//
//   - cpu_ratio_target, cpu_ratio_other: fio's CPU per read with capture
//     off / fio's plus the capture's CPU per read in the mode. This is the
//     IOPS ratio a CPU-bound fio would see, robust to other tenants; it
//     leaves out the loop device's workers, which capture does not load, so
//     it overstates the overhead;
//
//   - fio_ns/io_off, added_ns/io_target, added_ns/io_other: the same in ns;
//
//   - cpu_s/Mevents: this process's CPU (ring reader and JSON encoding)
//     per million events, over the target segments; lost: events lost.
//
//     go test ./bpf -run '^$' -bench CaptureOverhead -benchtime 30x
func BenchmarkCaptureOverhead(b *testing.B) {
	r := newBenchRig(b)
	cmd := r.startFio(b, time.Duration(b.N*3+2)*r.segment)
	time.Sleep(r.segment) // fio's start-up
	tg := &toggler{r: r}
	trim := r.segment / 5
	var segs []segment
	for i := range b.N {
		for k := range 3 {
			m := mode((k + i) % 3)
			tg.set(b, m)
			time.Sleep(trim)
			s := segment{mode: m, a: r.sample(b, cmd.Process.Pid, tg.events.Load())}
			time.Sleep(r.segment - 2*trim)
			s.b = r.sample(b, cmd.Process.Pid, tg.events.Load())
			time.Sleep(trim)
			segs = append(segs, s)
		}
	}
	tg.set(b, modeOff)
	if err := cmd.Wait(); err != nil {
		b.Fatalf("fio: %v", err)
	}
	b.StopTimer()
	reportOverhead(b, segs, tg.lost)
}

func reportOverhead(b *testing.B, segs []segment, lost uint64) {
	var (
		ratios, cpuRatios, added [3][]float64
		fioOff, offIOPS          []float64
		events                   int64
		targetCPU                time.Duration
	)
	for c := 0; c+3 <= len(segs); c += 3 {
		var cyc [3]segment
		for _, s := range segs[c : c+3] {
			cyc[s.mode] = s
		}
		off := cyc[modeOff]
		offFio, _ := off.cpuPerIO()
		fioOff, offIOPS = append(fioOff, offFio), append(offIOPS, off.iops())
		for _, m := range []mode{modeTarget, modeOther} {
			fio, capture := cyc[m].cpuPerIO()
			ratios[m] = append(ratios[m], cyc[m].iops()/off.iops())
			cpuRatios[m] = append(cpuRatios[m], offFio/(fio+capture))
			added[m] = append(added[m], fio+capture-offFio)
		}
		t := cyc[modeTarget]
		events += t.b.events - t.a.events
		targetCPU += t.b.ownCPU - t.a.ownCPU
		b.Logf("cycle %d: IOPS off %.0f target %.0f other %.0f; fio ns/io off %.0f", c/3,
			off.iops(), t.iops(), cyc[modeOther].iops(), offFio)
	}
	_, iops, _ := quartiles(offIOPS)
	_, fioNs, _ := quartiles(fioOff)
	b.ReportMetric(iops, "iops_off")
	b.ReportMetric(fioNs, "fio_ns/io_off")
	for m, name := range map[mode]string{modeTarget: "target", modeOther: "other"} {
		q1, q2, q3 := quartiles(ratios[m])
		b.ReportMetric(q2, "ratio_"+name)
		b.ReportMetric(q1, name+"_q1")
		b.ReportMetric(q3, name+"_q3")
		_, cr, _ := quartiles(cpuRatios[m])
		b.ReportMetric(cr, "cpu_ratio_"+name)
		_, ns, _ := quartiles(added[m])
		b.ReportMetric(ns, "added_ns/io_"+name)
	}
	if events > 0 {
		b.ReportMetric(targetCPU.Seconds()*1e6/float64(events), "cpu_s/Mevents")
	}
	b.ReportMetric(float64(lost), "lost")
}

func rusage(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func quartiles(xs []float64) (q1, q2, q3 float64) {
	s := slices.Clone(xs)
	slices.Sort(s)
	at := func(p float64) float64 { // linear interpolation between ranks
		if len(s) == 0 {
			return 0
		}
		x := p * float64(len(s)-1)
		i := int(x)
		if i+1 >= len(s) {
			return s[len(s)-1]
		}
		return s[i] + (x-float64(i))*(s[i+1]-s[i])
	}
	return at(0.25), at(0.5), at(0.75)
}

// BenchmarkProgramCost reports the BPF program's own run time per request,
// from the kernel's run-time statistics, which add two clock reads per run
// of their own (~55 ns here, measured with an empty program): they are on
// only in this benchmark, never while measuring IOPS. prog_ns/hit is for
// requests to a captured device, prog_ns/miss for requests filtered out.
// One b.N iteration is one segment (OBD_BENCH_SEGMENT) of each.
//
//	go test ./bpf -run '^$' -bench ProgramCost -benchtime 5x
func BenchmarkProgramCost(b *testing.B) {
	r := newBenchRig(b)
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Fatalf("enable BPF run-time statistics: %v", err)
	}
	defer stats.Close()
	cmd := r.startFio(b, time.Duration(b.N*2+2)*r.segment)
	time.Sleep(r.segment)
	var ns, runs [2]uint64
	for range b.N {
		for m, dev := range []bpf.Dev{r.tDev, r.oDev} {
			c, err := bpf.Open(bpf.Options{Devices: []bpf.Dev{dev}})
			if err != nil {
				b.Fatal(err)
			}
			progs, _ := bpftest.BPFObjects(b, os.Getpid(), "obd_")
			go func() { // ends at Close
				var ev bpf.Event
				for c.Read(context.Background(), &ev) == nil {
				}
			}()
			time.Sleep(r.segment)
			for _, p := range bpftest.Bpftool(b, "prog") {
				if slices.Contains(progs, p.ID) {
					ns[m] += p.RunTimeNs
					runs[m] += p.RunCnt
				}
			}
			c.Close()
		}
	}
	if err := cmd.Wait(); err != nil {
		b.Fatalf("fio: %v", err)
	}
	for m, name := range []string{"prog_ns/hit", "prog_ns/miss"} {
		if runs[m] > 0 {
			b.ReportMetric(float64(ns[m])/float64(runs[m]), name)
		}
	}
}
