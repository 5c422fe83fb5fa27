package bpf

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// DefaultRingSize is the ring buffer size used when Options.RingSize is 0.
// 8 MiB holds about 95,000 events (88 bytes each with the ring's header):
// at 4k random reads on a RAM-backed loop device (~200k IOPS here) that is
// half a second of slack for a reader that falls behind.
const DefaultRingSize = 8 << 20

// DefaultMaxDelay is how often a Read waiting on an empty ring looks again,
// when Options.MaxDelay is 0: the longest an event waits to be read.
const DefaultMaxDelay = 50 * time.Millisecond

// MaxDevices is the capacity of the kernel-side device set.
const MaxDevices = 1024

// ErrClosed is returned by methods of a Capture after Close.
var ErrClosed = errors.New("bpf: capture closed")

// AttachMode selects which hook the program attaches to.
type AttachMode int

const (
	// AttachAuto uses tp_btf when the kernel's BTF describes the block
	// tracepoints, and the classic tracepoints otherwise.
	AttachAuto AttachMode = iota
	// AttachBTF forces tp_btf/block_rq_issue.
	AttachBTF
	// AttachTracepoint forces tracepoint/block/block_rq_issue, which needs
	// tracefs mounted.
	AttachTracepoint
)

// String returns "auto", "tp_btf" or "tracepoint".
func (m AttachMode) String() string {
	switch m {
	case AttachAuto:
		return "auto"
	case AttachBTF:
		return "tp_btf"
	case AttachTracepoint:
		return "tracepoint"
	}
	return fmt.Sprintf("AttachMode(%d)", int(m))
}

// Options configure Open. The zero value reports reads on no device yet,
// with the default ring size and no completion hook.
type Options struct {
	// RingSize is the ring buffer size in bytes: a power of two, at least
	// a page. 0 means DefaultRingSize.
	RingSize int
	// IncludeWrites also reports write requests (flushes, discards and
	// other operations are never reported).
	IncludeWrites bool
	// Completion attaches block_rq_complete and adds a KindComplete event,
	// carrying the latency, for each reported request that completes.
	Completion bool
	// MaxDelay is how often a Read waiting on an empty ring looks again
	// (0: DefaultMaxDelay). The program never wakes the reader: reading in
	// batches on a timer is what keeps the CPU per event low (an epoll
	// wake-up per event costs more than the event). At the default ring
	// size and delay that leaves room for 1.9 million events a second.
	// A negative value makes the program wake the reader for each event
	// instead, for the lowest latency.
	MaxDelay time.Duration
	// Attach selects the hook; AttachAuto picks the best available.
	Attach AttachMode
	// Devices is the initial device set; more can be added while running.
	Devices []Dev
}

// Capture is a loaded and attached capture program. Read must be called from
// one goroutine at a time; the other methods are safe to call concurrently
// with Read and with each other.
type Capture struct {
	coll     *ebpf.Collection
	devices  *ebpf.Map // the set, authoritative
	filter   *ebpf.Map // its prefilter (see capture.c)
	lost     *ebpf.Map
	rd       *ringbuf.Reader
	mode     AttachMode
	maxDelay time.Duration // < 0: block in epoll, woken per event

	mu       sync.Mutex // guards links, closed, set and the device maps' updates
	links    []link.Link
	set      map[Dev]struct{}
	closed   bool
	detached atomic.Bool
	closing  atomic.Bool

	// readMu is held for the whole of a Read, so Close cannot unmap the
	// ring under it; Close wakes the reader first.
	readMu  sync.Mutex
	rec     ringbuf.Record
	drained bool
	timer   *time.Timer
	wake    chan struct{} // closed by Detach: ends a Read's wait at once
}

// Open loads the program, fills the device set and attaches. It fails with
// ErrPermission, ErrMemlock, ErrNoBTF or ErrNoTracepoint (wrapped, with the
// remedy in the message) when the machine cannot run it.
func Open(opts Options) (*Capture, error) {
	ringSize, err := checkRingSize(opts.RingSize)
	if err != nil {
		return nil, err
	}
	if err := checkPrivileges(); err != nil {
		return nil, err
	}
	if err := removeMemlock(); err != nil {
		return nil, err
	}
	kernel, err := btf.LoadKernelSpec()
	if err != nil {
		return nil, fmt.Errorf("%w: %v (CO-RE needs CONFIG_DEBUG_INFO_BTF=y, /sys/kernel/btf/vmlinux)", ErrNoBTF, err)
	}
	mode, err := chooseMode(opts.Attach, kernel)
	if err != nil {
		return nil, err
	}
	coll, err := loadCollection(opts, ringSize, mode, kernel)
	if err != nil {
		return nil, err
	}
	c := &Capture{
		coll:     coll,
		devices:  coll.Maps[captureMapObdDevices],
		filter:   coll.Maps[captureMapObdFilter],
		lost:     coll.Maps[captureMapObdLost],
		set:      make(map[Dev]struct{}),
		mode:     mode,
		maxDelay: opts.MaxDelay,
		wake:     make(chan struct{}),
	}
	if c.maxDelay == 0 {
		c.maxDelay = DefaultMaxDelay
	}
	if err := c.start(opts, mode); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// start fills the device set, opens the reader and attaches, in that order,
// so no event is produced before it can be read. The completion hook goes
// first, so every request reported at issue can be matched at completion.
func (c *Capture) start(opts Options, mode AttachMode) error {
	for _, d := range opts.Devices {
		if err := c.AddDevice(d); err != nil {
			return err
		}
	}
	rd, err := ringbuf.NewReader(c.coll.Maps[captureMapObdEvents])
	if err != nil {
		return fmt.Errorf("bpf: open ring buffer reader: %w", err)
	}
	c.rd = rd
	if c.maxDelay > 0 {
		// Read only calls ReadInto with data in the ring: a deadline in
		// the past keeps its epoll_wait from ever blocking.
		rd.SetDeadline(time.Unix(0, 1))
	}
	issue, complete := programNames(mode)
	if opts.Completion {
		if err := c.attach(mode, complete, "block_rq_complete"); err != nil {
			return err
		}
	}
	return c.attach(mode, issue, "block_rq_issue")
}

func (c *Capture) attach(mode AttachMode, prog, tracepoint string) error {
	p := c.coll.Programs[prog]
	var (
		l   link.Link
		err error
	)
	if mode == AttachBTF {
		l, err = link.AttachTracing(link.TracingOptions{Program: p, AttachType: ebpf.AttachTraceRawTp})
	} else {
		l, err = link.Tracepoint("block", tracepoint, p, nil)
	}
	if err != nil {
		return fmt.Errorf("bpf: attach %s to %s (%s): %w", prog, tracepoint, mode, explainErrno(err))
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.links = append(c.links, l)
	return nil
}

// programNames returns the issue and completion programs of a family.
func programNames(mode AttachMode) (issue, complete string) {
	if mode == AttachBTF {
		return captureProgObdRqIssue, captureProgObdRqComplete
	}
	return captureProgObdTpIssue, captureProgObdTpComplete
}

// loadCollection loads only the programs the mode and options need, so a
// kernel without the tp_btf hooks never sees (or rejects) those programs.
func loadCollection(opts Options, ringSize uint32, mode AttachMode, kernel *btf.Spec) (*ebpf.Collection, error) {
	spec, err := loadCapture()
	if err != nil {
		return nil, fmt.Errorf("bpf: parse embedded object: %w", err)
	}
	issue, complete := programNames(mode)
	for name := range spec.Programs {
		if name != issue && (name != complete || !opts.Completion) {
			delete(spec.Programs, name)
		}
	}
	spec.Maps[captureMapObdEvents].MaxEntries = ringSize
	spec.Maps[captureMapObdDevices].MaxEntries = MaxDevices
	if !opts.Completion {
		spec.Maps[captureMapObdInflight].MaxEntries = 1 // nothing tracks latency
	}
	if err := spec.Variables[captureVarIncludeWrites].Set(opts.IncludeWrites); err != nil {
		return nil, fmt.Errorf("bpf: set include_writes: %w", err)
	}
	if err := spec.Variables[captureVarTrackLatency].Set(opts.Completion); err != nil {
		return nil, fmt.Errorf("bpf: set track_latency: %w", err)
	}
	if err := spec.Variables[captureVarNoWakeup].Set(opts.MaxDelay >= 0); err != nil {
		return nil, fmt.Errorf("bpf: set no_wakeup: %w", err)
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{
		Programs: ebpf.ProgramOptions{KernelTypes: kernel},
	})
	if err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("bpf: the verifier rejected the program: %+v", verr)
		}
		return nil, fmt.Errorf("bpf: load program (%s): %w", mode, explainErrno(err))
	}
	return coll, nil
}

// Mode reports the hook the program is attached to.
func (c *Capture) Mode() AttachMode { return c.mode }

// AddDevice starts reporting requests to d. Adding a device already in the
// set is not an error.
func (c *Capture) AddDevice(d Dev) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	if err := c.devices.Update(uint32(d), uint8(1), ebpf.UpdateAny); err != nil {
		if errors.Is(err, unix.E2BIG) {
			return fmt.Errorf("bpf: add device %s: device set is full (%d devices)", d, MaxDevices)
		}
		return fmt.Errorf("bpf: add device %s: %w", d, err)
	}
	c.set[d] = struct{}{}
	// After the set: once its bit shows, the program finds d in the map.
	return c.writeFilter()
}

// RemoveDevice stops reporting requests to d; requests already in the ring
// are still delivered. Removing a device not in the set is not an error.
func (c *Capture) RemoveDevice(d Dev) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	if err := c.devices.Delete(uint32(d)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("bpf: remove device %s: %w", d, err)
	}
	delete(c.set, d)
	return c.writeFilter()
}

// devFilter is the value of obd_filter: one bit per devHash bucket.
type devFilter [64]uint64

// devHash must match dev_hash in capture.c.
func devHash(d Dev) uint32 { return (uint32(d) * 0x9E3779B1) >> 20 }

func filterOf(set map[Dev]struct{}) devFilter {
	var f devFilter
	for d := range set {
		h := devHash(d)
		f[h>>6] |= 1 << (h & 63)
	}
	return f
}

// writeFilter rewrites the program's prefilter from the set; c.mu is held.
func (c *Capture) writeFilter() error {
	if err := c.filter.Update(uint32(0), filterOf(c.set), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("bpf: update device prefilter: %w", err)
	}
	return nil
}

// Devices lists the device set, in no particular order.
func (c *Capture) Devices() ([]Dev, error) {
	if err := c.checkOpen(); err != nil {
		return nil, err
	}
	var (
		out []Dev
		key uint32
		val uint8
	)
	it := c.devices.Iterate()
	for it.Next(&key, &val) {
		out = append(out, Dev(key))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("bpf: list devices: %w", err)
	}
	return out, nil
}

// Lost returns how many events the program dropped because the ring buffer
// was full, summed over CPUs, since Open.
func (c *Capture) Lost() (uint64, error) {
	if err := c.checkOpen(); err != nil {
		return 0, err
	}
	var perCPU []uint64
	if err := c.lost.Lookup(uint32(0), &perCPU); err != nil {
		return 0, fmt.Errorf("bpf: read lost-event counter: %w", err)
	}
	var sum uint64
	for _, n := range perCPU {
		sum += n
	}
	return sum, nil
}

// Read blocks until the next event and decodes it into ev. It returns
// ctx.Err() when ctx is done first. After Detach it returns the events still
// in the ring without blocking, then io.EOF; after Close, ErrClosed.
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
		var err error
		switch empty := c.rd.AvailableBytes() == 0; {
		case empty && c.detached.Load():
			c.drained = true
			return io.EOF
		case empty && c.maxDelay < 0:
			err = c.block(ctx)
		case empty:
			c.sleep(ctx)
			continue
		default:
			err = c.rd.ReadInto(&c.rec)
		}
		switch {
		case err == nil:
			return ev.UnmarshalBinary(c.rec.RawSample)
		case errors.Is(err, ringbuf.ErrFlushed), errors.Is(err, os.ErrDeadlineExceeded):
			// Woken by Detach or ctx (the loop head decides), or ReadInto's
			// non-blocking epoll found the ring drained.
			continue
		case errors.Is(err, ringbuf.ErrClosed), errors.Is(err, os.ErrClosed):
			return ErrClosed
		default:
			return fmt.Errorf("bpf: read ring buffer: %w", err)
		}
	}
}

// sleep waits maxDelay for the ring to fill, or less if ctx ends or Detach
// is called.
func (c *Capture) sleep(ctx context.Context) {
	if c.timer == nil {
		c.timer = time.NewTimer(c.maxDelay)
	} else {
		c.timer.Reset(c.maxDelay)
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
	return c.rd.ReadInto(&c.rec)
}

// Detach stops the program reporting new events, and makes Read drain what
// is already in the ring and then return io.EOF. The maps stay readable, so
// Lost still works; Close releases them.
func (c *Capture) Detach() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	var errs []error
	for _, l := range c.links {
		if err := l.Close(); err != nil {
			errs = append(errs, fmt.Errorf("bpf: detach: %w", err))
		}
	}
	c.links = nil
	if c.rd != nil && !c.detached.Swap(true) {
		close(c.wake)
		// Wakes a Read blocked in epoll; the eventfd stays signalled until
		// consumed, so a Read that has not blocked yet is woken too.
		if err := c.rd.Flush(); err != nil {
			errs = append(errs, fmt.Errorf("bpf: wake reader: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Close detaches the program and releases the ring and maps. It is safe to
// call more than once, and makes a blocked Read return ErrClosed.
func (c *Capture) Close() error {
	if c.closing.Swap(true) {
		return nil
	}
	errs := []error{c.Detach()}
	if c.rd != nil {
		_ = c.rd.Flush() // Detach flushes only once; a reader may be blocked again
	}
	c.readMu.Lock()
	defer c.readMu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	if c.rd != nil {
		errs = append(errs, c.rd.Close())
	}
	c.coll.Close()
	return errors.Join(errs...)
}

func (c *Capture) checkOpen() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	return nil
}
