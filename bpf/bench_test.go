package bpf_test

import (
	"context"
	"io"
	"os"
	"runtime"
	"slices"
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

type mode int

const (
	modeOff mode = iota
	modeTarget
	modeOther
)

// segment is the middle of a span spent in one mode.
type segment struct {
	mode mode
	a, b sample
}

func (s segment) iops() float64 { return float64(s.b.reads-s.a.reads) / s.b.at.Sub(s.a.at).Seconds() }

// cpuPerIO is the CPU per read of fio, of the rest of this process but the
// reader (the FUSE daemon; next to nothing for tmpfs), and of the reader.
func (s segment) cpuPerIO() (fio, daemon, reader float64) {
	n := float64(s.b.reads - s.a.reads)
	rd := s.b.readerCPU - s.a.readerCPU
	return float64(s.b.fioCPU-s.a.fioCPU) / n, float64(s.b.procCPU-s.a.procCPU-rd) / n, float64(rd) / n
}

// toggler switches one capture between off, on the target device and on
// the other device only, with a reader encoding every event as JSON.
type toggler struct {
	r         *benchRig
	c         *bpf.Capture
	done      chan error
	events    atomic.Int64
	readerTid atomic.Int64
	lost      uint64
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
		started := make(chan struct{})
		go func() { t.done <- t.read(c, started) }()
		<-started
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
// It keeps to one OS thread, whose CPU time is then the reader's.
func (t *toggler) read(c *bpf.Capture, started chan<- struct{}) error {
	runtime.LockOSThread() // the thread ends with the goroutine
	t.readerTid.Store(int64(unix.Gettid()))
	close(started)
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
// (QD32, direct, io_uring) on each kind of device (sub-benchmarks tmpfs,
// fuse-warm, fuse-cold; see deviceKind). One fio run lasts each
// sub-benchmark while capture cycles through three modes, a segment each
// (OBD_BENCH_SEGMENT, default 1s), rotating the order every cycle: off, on
// the fio device, and on another device only. Adjacent seconds of one run
// share most of a shared machine's noise, which separate runs do not. Each
// segment is measured over its middle 60% with exact counters: reads
// completed (/sys/dev/block/M:m/stat) and scheduler CPU time of fio's
// threads, of this process and of the reader's thread. One b.N iteration is
// one cycle. Reported, as medians over cycles:
//
//   - ratio_target, ratio_other: IOPS in the mode / IOPS with capture off,
//     with quartiles (target_q1, target_q3, ...) as a measure of the noise;
//
//   - cpu_ratio_target, cpu_ratio_other: CPU per read with capture off /
//     CPU per read in the mode, counting fio, the FUSE daemon (this process
//     but the reader) and the reader. This is the IOPS ratio a CPU-bound
//     reader would see, robust to other tenants; it leaves out the loop
//     device's kernel workers, which capture does not load, so it
//     overstates the overhead;
//
//   - cpu_ns/io_off (and fio_ns/io_off), added_ns/io_target,
//     added_ns/io_other: the same in ns;
//
//   - reader_ns/event: the reader thread's CPU (ring, decoding, JSON) per
//     event, over the target segments; lost: events lost.
//
//     go test ./bpf -run '^$' -bench CaptureOverhead -benchtime 60x
//     go test ./bpf -run '^$' -bench CaptureOverhead/fuse-cold -benchtime 60x
func BenchmarkCaptureOverhead(b *testing.B) {
	for _, k := range []deviceKind{kindTmpfs, kindFUSEWarm, kindFUSECold} {
		b.Run(string(k), func(b *testing.B) { captureOverhead(b, newBenchRig(b, k)) })
	}
}

func captureOverhead(b *testing.B, r *benchRig) {
	cmd := r.startFio(b, time.Duration(b.N*3+2)*r.segment)
	time.Sleep(r.segment) // fio's start-up
	tg := &toggler{r: r}
	trim := r.segment / 5
	var segs []segment
	for i := range b.N {
		for k := range 3 {
			m := mode((k + i) % 3)
			tg.set(b, m)
			if r.drop != nil {
				r.drop(b)
			}
			time.Sleep(trim)
			tid := 0
			if m != modeOff {
				tid = int(tg.readerTid.Load())
			}
			s := segment{mode: m, a: r.sample(b, cmd.Process.Pid, tid, tg.events.Load())}
			time.Sleep(r.segment - 2*trim)
			s.b = r.sample(b, cmd.Process.Pid, tid, tg.events.Load())
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
		cpuOff, fioOff, offIOPS  []float64
		events                   int64
		readerCPU                time.Duration
	)
	for c := 0; c+3 <= len(segs); c += 3 {
		var cyc [3]segment
		for _, s := range segs[c : c+3] {
			cyc[s.mode] = s
		}
		off := cyc[modeOff]
		offFio, offDaemon, _ := off.cpuPerIO()
		offCPU := offFio + offDaemon
		cpuOff, fioOff, offIOPS = append(cpuOff, offCPU), append(fioOff, offFio), append(offIOPS, off.iops())
		for _, m := range []mode{modeTarget, modeOther} {
			fio, daemon, reader := cyc[m].cpuPerIO()
			ratios[m] = append(ratios[m], cyc[m].iops()/off.iops())
			cpuRatios[m] = append(cpuRatios[m], offCPU/(fio+daemon+reader))
			added[m] = append(added[m], fio+daemon+reader-offCPU)
		}
		t := cyc[modeTarget]
		events += t.b.events - t.a.events
		readerCPU += t.b.readerCPU - t.a.readerCPU
		b.Logf("cycle %d: IOPS off %.0f target %.0f other %.0f; cpu ns/io off %.0f (fio %.0f)", c/3,
			off.iops(), t.iops(), cyc[modeOther].iops(), offCPU, offFio)
	}
	_, iops, _ := quartiles(offIOPS)
	_, cpuNs, _ := quartiles(cpuOff)
	_, fioNs, _ := quartiles(fioOff)
	b.ReportMetric(iops, "iops_off")
	b.ReportMetric(cpuNs, "cpu_ns/io_off")
	b.ReportMetric(fioNs, "fio_ns/io_off")
	for m, name := range map[mode]string{modeTarget: "target", modeOther: "other"} {
		q1, q2, q3 := quartiles(ratios[m])
		b.ReportMetric(q2, "ratio_"+name)
		b.ReportMetric(q1, name+"_q1")
		b.ReportMetric(q3, name+"_q3")
		cq1, cr, cq3 := quartiles(cpuRatios[m])
		b.ReportMetric(cr, "cpu_ratio_"+name)
		b.ReportMetric(cq1, "cpu_"+name+"_q1")
		b.ReportMetric(cq3, "cpu_"+name+"_q3")
		_, ns, _ := quartiles(added[m])
		b.ReportMetric(ns, "added_ns/io_"+name)
	}
	if events > 0 {
		b.ReportMetric(float64(readerCPU.Nanoseconds())/float64(events), "reader_ns/event")
	}
	b.ReportMetric(float64(lost), "lost")
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

// BenchmarkProgramCost reports the BPF programs' own run time per request,
// from the kernel's run-time statistics, which add two clock reads per run
// of their own (~55 ns here, measured with an empty program): they are on
// only in this benchmark, never while measuring IOPS. The time of every
// program of the capture (the hook and the reader's flushes of partial
// batches) is divided by the hook's runs. prog_ns/hit is for requests to a
// captured device, prog_ns/miss for requests filtered out: medians over
// segments (OBD_BENCH_SEGMENT), with quartiles. One b.N iteration is one
// segment of each, in alternating order, on the tmpfs device.
//
//	go test ./bpf -run '^$' -bench ProgramCost -benchtime 20x
func BenchmarkProgramCost(b *testing.B) {
	r := newBenchRig(b, kindTmpfs)
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Fatalf("enable BPF run-time statistics: %v", err)
	}
	defer stats.Close()
	cmd := r.startFio(b, time.Duration(b.N*2+2)*r.segment)
	time.Sleep(r.segment)
	var perRun [2][]float64
	for i := range b.N {
		for k := range 2 {
			m := (k + i) % 2
			dev := []bpf.Dev{r.tDev, r.oDev}[m]
			if ns, runs := programCost(b, r, dev); runs > 0 {
				perRun[m] = append(perRun[m], float64(ns)/float64(runs))
			}
		}
	}
	if err := cmd.Wait(); err != nil {
		b.Fatalf("fio: %v", err)
	}
	for m, name := range []string{"hit", "miss"} {
		q1, q2, q3 := quartiles(perRun[m])
		b.ReportMetric(q2, "prog_ns/"+name)
		b.ReportMetric(q1, name+"_q1")
		b.ReportMetric(q3, name+"_q3")
	}
}

// programCost captures dev for a segment, draining events, and returns the
// run time of all the capture's programs and the number of hook runs.
func programCost(b *testing.B, r *benchRig, dev bpf.Dev) (ns, runs uint64) {
	c, err := bpf.Open(bpf.Options{Devices: []bpf.Dev{dev}})
	if err != nil {
		b.Fatal(err)
	}
	progs, _ := bpftest.BPFObjects(b, os.Getpid(), "obd_")
	done := make(chan struct{})
	go func() {
		defer close(done)
		var ev bpf.Event
		for c.Read(context.Background(), &ev) == nil {
		}
	}()
	time.Sleep(r.segment)
	// Detach first: the last flushes of partial batches are part of it.
	if err := c.Detach(); err != nil {
		b.Fatal(err)
	}
	<-done
	for _, p := range bpftest.Bpftool(b, "prog") {
		if slices.Contains(progs, p.ID) {
			ns += p.RunTimeNs
			if strings.Contains(p.Name, "issue") {
				runs += p.RunCnt
			}
		}
	}
	c.Close()
	return ns, runs
}
