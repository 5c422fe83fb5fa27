package bpf

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// flushAttempts bounds the retries of a flush that keeps finding its CPU's
// batch busy. A program holds the batch for a few hundred nanoseconds, and
// the flush interrupts it (an IPI), so the next attempt nearly always
// succeeds; a CPU still busy after this many keeps its old bound and is
// flushed next time.
const flushAttempts = 100

// visibilityMargin is how far before the reader's look at the batches a
// CPU seen with an empty, idle batch is taken to have produced everything:
// a program marks the batch busy before it reads the clock, but that store
// may reach other CPUs a little after the clock read (store buffers drain
// within a microsecond).
const visibilityMargin = 10 * time.Microsecond

// batchHead is struct obd_head (capture.c), the state of a CPU's batch:
// whether a program holds it, how many events it has, and the first one's
// time. TestEventLayout checks the layout.
type batchHead struct {
	busy  bool
	count uint32
	first uint64
}

const batchHeadSize = 16

// UnmarshalBinary decodes a struct obd_head.
func (h *batchHead) UnmarshalBinary(b []byte) error {
	if len(b) != batchHeadSize {
		return fmt.Errorf("%w: %d-byte batch head, want %d", ErrBadRecord, len(b), batchHeadSize)
	}
	le := binary.LittleEndian
	h.busy = le.Uint32(b) != 0
	h.count = le.Uint32(b[4:])
	h.first = le.Uint64(b[8:])
	return nil
}

// Read blocks until the next event and decodes it into ev. Events come in
// timestamp order, each about MaxDelay after it was reported at the latest
// (see Options). It returns ctx.Err() when ctx is done first. After Detach
// it returns the events still to be read without blocking, then io.EOF;
// after Close, ErrClosed.
func (c *Capture) Read(ctx context.Context, ev *Event) error {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	for {
		if c.closing.Load() {
			return ErrClosed
		}
		if c.drained {
			return io.EOF
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if ok, err := c.st.pop(ev); ok || err != nil {
			return err
		}
		if c.final {
			c.drained = true
			return io.EOF
		}
		err := c.fill(ctx)
		switch {
		case err == nil:
		case errors.Is(err, ringbuf.ErrFlushed), errors.Is(err, os.ErrDeadlineExceeded):
			// Woken by Detach or ctx: the loop head decides.
		case errors.Is(err, ringbuf.ErrClosed), errors.Is(err, os.ErrClosed):
			return ErrClosed
		default:
			return err
		}
	}
}

// fill brings more events into the stream, or waits for them; the caller
// found none it could return.
func (c *Capture) fill(ctx context.Context) error {
	switch {
	case c.detached.Load():
		return c.finish()
	case c.maxDelay < 0:
		if c.rd.AvailableBytes() == 0 {
			return c.block(ctx)
		}
		return c.refill(false)
	case time.Since(c.lastTick) >= c.maxDelay:
		return c.refill(true)
	case c.rd.AvailableBytes() >= c.rd.BufferSize()/4:
		// A burst is filling the ring faster than MaxDelay: make room
		// before it overflows.
		return c.refill(false)
	}
	c.sleep(ctx, c.maxDelay-time.Since(c.lastTick))
	return nil
}

// refill reads the ring. On a tick (every MaxDelay) it also looks at each
// CPU's batch, and flushes those that waited too long, after which it knows
// how old the events still to come from each CPU can be.
func (c *Capture) refill(tick bool) error {
	if tick {
		c.lastTick = time.Now()
	}
	if _, err := c.drain(); err != nil || c.flusher == nil {
		return err // no batches: every event in the ring could go at once
	}
	if !tick {
		c.st.updateWatermark()
		return nil
	}
	bounds, err := c.settle()
	if err != nil {
		return err
	}
	// The bounds hold once what the batches sent before is read too.
	emptied, err := c.drain()
	if err != nil {
		return err
	}
	if emptied {
		for cpu, t := range bounds {
			c.st.raise(cpu, t)
		}
	}
	c.st.updateWatermark()
	return nil
}

// settle returns, per CPU, a time no event still to come from it (beyond
// what is in the ring) is older than: with nothing in its batch, the time
// of the look; with a recent batch, its first event's; a batch older than
// half of MaxDelay (its CPU has gone quiet: the program sends a batch that
// old with its next event) it flushes first. A CPU caught holding its batch
// gets 0: nothing new is known about it.
func (c *Capture) settle() ([]uint64, error) {
	now := c.clock.now()
	if err := c.heads.Lookup(uint32(0), c.headBuf); err != nil {
		return nil, fmt.Errorf("bpf: read the CPUs' batch heads: %w", err)
	}
	at := now - uint64(visibilityMargin)
	bounds := c.bounds
	for cpu, h := range c.headBuf {
		bounds[cpu] = 0
		switch {
		case h.busy:
		case h.count == 0:
			bounds[cpu] = at
		case h.first+uint64(maxAge(c.maxDelay)) > now:
			bounds[cpu] = h.first
		default:
			flushed, err := c.flushCPU(cpu)
			if err != nil {
				return nil, err
			}
			if flushed {
				bounds[cpu] = at
			}
		}
	}
	return bounds, nil
}

// finish reads the last events after Detach: what is in the ring, and
// what every CPU's batch still holds.
func (c *Capture) finish() error {
	if _, err := c.drain(); err != nil { // room in the ring for the batches
		return err
	}
	if c.flusher != nil {
		for cpu := range c.ncpu {
			if _, err := c.flushCPU(cpu); err != nil {
				return err
			}
		}
		if _, err := c.drain(); err != nil {
			return err
		}
	}
	c.final = true
	c.st.releaseAll()
	return nil
}

// flushCPU runs the flush program on cpu until it finds the batch free.
// An offline CPU counts as flushed: it runs nothing.
func (c *Capture) flushCPU(cpu int) (bool, error) {
	for range flushAttempts {
		busy, err := flushOn(c.flusher, cpu)
		switch {
		case errors.Is(err, unix.ENXIO):
			return true, nil
		case err != nil:
			return false, err
		case !busy:
			return true, nil
		}
	}
	return false, nil
}

// flushOn runs the flush program on cpu; busy reports that it interrupted
// a program holding the batch.
func flushOn(p *ebpf.Program, cpu int) (busy bool, err error) {
	ret, err := p.Run(&ebpf.RunOptions{CPU: uint32(cpu), Flags: unix.BPF_F_TEST_RUN_ON_CPU})
	if err != nil {
		return false, fmt.Errorf("bpf: flush the batch of CPU %d: %w", cpu, err)
	}
	return ret != 0, nil
}

// drain moves the records in the ring into the stream, at most a ring's
// worth, so a producer faster than the reader cannot keep it here; emptied
// reports that it found the ring empty.
func (c *Capture) drain() (emptied bool, err error) {
	for budget := c.rd.BufferSize(); budget > 0; {
		if c.rd.AvailableBytes() == 0 {
			return true, nil
		}
		if err := c.rd.ReadInto(&c.rec); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, ringbuf.ErrFlushed) {
				return true, nil
			}
			return false, err
		}
		if err := c.st.ingest(c.rec.RawSample); err != nil {
			return false, err
		}
		budget -= len(c.rec.RawSample) + hdrSize
	}
	return false, nil
}

// sleep waits d for the ring to fill, or less if ctx ends or Detach is
// called.
func (c *Capture) sleep(ctx context.Context, d time.Duration) {
	if d <= 0 {
		return
	}
	if c.timer == nil {
		c.timer = time.NewTimer(d)
	} else {
		c.timer.Reset(d)
	}
	select {
	case <-c.timer.C:
	case <-c.wake:
	case <-ctx.Done():
	}
}

// block is ReadInto on an empty ring with per-event wake-ups: it blocks in
// epoll until the program submits, or ctx or Detach flush the reader.
func (c *Capture) block(ctx context.Context) error {
	if ctx.Done() != nil {
		stop := context.AfterFunc(ctx, func() { _ = c.rd.Flush() })
		defer stop()
	}
	if err := c.rd.ReadInto(&c.rec); err != nil {
		return err
	}
	return c.st.ingest(c.rec.RawSample)
}

// quiesce waits until every run of a BPF program begun before the call has
// ended: membarrier(MEMBARRIER_CMD_GLOBAL) waits for an RCU grace period,
// which outlasts them (they run under rcu_read_lock with preemption off).
// It is refused with nohz_full CPUs; then a generous sleep stands in.
func quiesce() error {
	const membarrierCmdGlobal = 1
	_, _, errno := unix.Syscall(unix.SYS_MEMBARRIER, membarrierCmdGlobal, 0, 0)
	switch errno {
	case 0:
		return nil
	case unix.EINVAL, unix.ENOSYS:
		time.Sleep(100 * time.Millisecond)
		return nil
	}
	return fmt.Errorf("bpf: membarrier: %w", errno)
}

// monoClock reads CLOCK_MONOTONIC, the clock of the events' timestamps,
// through Go's own monotonic clock (the same clock, read without a system
// call): one reading of each at the start gives the offset.
type monoClock struct {
	base uint64
	at   time.Time
}

func newMonoClock() (monoClock, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return monoClock{}, fmt.Errorf("bpf: read CLOCK_MONOTONIC: %w", err)
	}
	return monoClock{base: uint64(ts.Nano()), at: time.Now()}, nil
}

func (m monoClock) now() uint64 { return m.base + uint64(time.Since(m.at)) }
