package bpf_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/bpf"
	"github.com/obdtrace/obdtrace/bpf/bpftest"
	"github.com/obdtrace/obdtrace/internal/testutil"
)

// onCPU runs f on the given CPU.
func onCPU(t *testing.T, cpu int, f func()) {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var set, old unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		t.Fatal(err)
	}
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		t.Fatalf("pin to CPU %d: %v", cpu, err)
	}
	defer unix.SchedSetaffinity(0, &old)
	f()
}

// Reads issued alternately on each CPU land in different CPUs' batches,
// which reach the ring in another order; a reader running all along, and
// flushing meanwhile, must still return them exactly in issue order. With a
// one-page ring the batches are 6 events long, so full batches reach the
// ring while older events wait in another CPU's partial batch.
func TestOrderAcrossCPUs(t *testing.T) {
	if runtime.NumCPU() < 2 {
		testutil.Missing(t, "needs 2 CPUs for batches on two CPUs, have %d", runtime.NumCPU())
	}
	for _, ring := range []int{0, os.Getpagesize()} {
		t.Run(fmt.Sprintf("ring=%d", ring), func(t *testing.T) { orderAcrossCPUs(t, ring) })
	}
}

func orderAcrossCPUs(t *testing.T, ringSize int) {
	r := newRig(t)
	ncpu := runtime.NumCPU()
	c := open(t, bpf.Options{Devices: []bpf.Dev{r.devA}, RingSize: ringSize, MaxDelay: 5 * time.Millisecond})
	type result struct {
		evs []bpf.Event
		err error
	}
	done := make(chan result, 1)
	go func() {
		var res result
		for {
			var ev bpf.Event
			if res.err = c.Read(context.Background(), &ev); res.err != nil {
				break
			}
			res.evs = append(res.evs, ev)
		}
		done <- res
	}()
	var want []span
	before := bpftest.Monotonic(t)
	for i := range 72 {
		s := span{int64(i) * 8192, 4096}
		onCPU(t, i%ncpu, func() { r.a.ReadDirect(t, s.off, s.n) })
		want = append(want, s)
		if i%24 == 23 {
			time.Sleep(10 * time.Millisecond) // let flushes fall between bursts
		}
	}
	after := bpftest.Monotonic(t)
	if err := c.Detach(); err != nil {
		t.Fatal(err)
	}
	res := <-done
	if !errors.Is(res.err, io.EOF) {
		t.Fatalf("Read: %v, want io.EOF after Detach", res.err)
	}
	checkExactReads(t, res.evs, r.devA, want, before, after)
}

// A partial batch reaches a waiting reader within about MaxDelay, without
// Detach: the Read must return well before its deadline (100 times
// MaxDelay, room for a loaded machine), which it would otherwise hit.
func TestPartialBatchArrivesWhileRunning(t *testing.T) {
	r := newRig(t)
	const maxDelay = 20 * time.Millisecond
	c := open(t, bpf.Options{Devices: []bpf.Dev{r.devA}, MaxDelay: maxDelay})
	r.a.ReadDirect(t, 1<<20, 4096)
	ctx, cancel := context.WithTimeout(context.Background(), 100*maxDelay)
	defer cancel()
	var ev bpf.Event
	err := c.Read(ctx, &ev)
	if errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("the partial batch did not arrive within %v (MaxDelay %v)", 100*maxDelay, maxDelay)
	}
	if err != nil || ev.Sector != 2048 || ev.Sectors != 8 {
		t.Fatalf("Read: %v, sector %d+%d; want the read of sector 2048+8", err, ev.Sector, ev.Sectors)
	}
}
