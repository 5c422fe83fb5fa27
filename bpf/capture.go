package bpf

import (
	"errors"
	"fmt"
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
// 8 MiB holds about 104,000 events (80 bytes each, in batches of 64 with a
// 16-byte header): at 4k random reads on a RAM-backed loop device (~200k
// IOPS here) that is half a second of slack for a reader that falls behind.
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
	// MaxDelay bounds how long an event waits before Read can return it
	// (0: DefaultMaxDelay): a Read with nothing to return looks at the
	// ring, and flushes the CPUs' partial batches, this often. The program
	// never wakes the reader: reading in batches on a timer is what keeps
	// the CPU per event low (an epoll wake-up per event costs more than
	// the event). At the default ring size and delay that leaves room for
	// 2 million events a second. A negative value sends each event to the
	// ring on its own and wakes the reader for it instead, for the lowest
	// latency.
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
	slots    *ebpf.Map // its slot table (see capture.c)
	lost     *ebpf.Map
	flusher  *ebpf.Program // nil when events are not batched
	heads    *ebpf.Map     // the state of the CPUs' batches
	ncpu     int
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
	// ring under it; Close wakes the reader first. It guards what follows.
	readMu   sync.Mutex
	rec      ringbuf.Record
	st       *stream
	headBuf  []batchHead
	bounds   []uint64
	clock    monoClock
	lastTick time.Time
	final    bool // the last events are in st: after them, io.EOF
	drained  bool
	timer    *time.Timer
	wake     chan struct{} // closed by Detach: ends a Read's wait at once
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
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, fmt.Errorf("bpf: count CPUs: %w", err)
	}
	coll, batch, err := loadBatched(opts, ringSize, mode, kernel)
	if err != nil {
		return nil, err
	}
	c := &Capture{
		coll:     coll,
		devices:  coll.Maps[captureMapObdDevices],
		slots:    coll.Maps[captureMapObdSlots],
		lost:     coll.Maps[captureMapObdLost],
		ncpu:     ncpu,
		set:      make(map[Dev]struct{}),
		mode:     mode,
		maxDelay: opts.MaxDelay,
		heads:    coll.Maps[captureMapObdHead],
		st:       newStream(ncpu),
		headBuf:  make([]batchHead, ncpu),
		bounds:   make([]uint64, ncpu),
		wake:     make(chan struct{}),
	}
	if c.clock, err = newMonoClock(); err != nil {
		coll.Close()
		return nil, err
	}
	if batch > 1 {
		c.flusher = coll.Programs[captureProgObdFlush]
	} else {
		c.st.releaseAll() // every event in the ring is final
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

// batchLen is the number of events per ring record: the most that keeps a
// record within an eighth of the ring, so a full ring loses little at a
// time, or 1 (no batching) for a reader woken per event.
func batchLen(ringSize uint32, maxDelay time.Duration) uint32 {
	if maxDelay < 0 {
		return 1
	}
	n := (ringSize/8 - 2*hdrSize) / eventSize // a ring record has its own 8-byte header
	return max(1, min(n, maxBatchLen))
}

// maxAge is how long a batch waits for more events before the program
// sends it with the next one, or the reader flushes it: half of MaxDelay,
// so an event waits about MaxDelay at most.
func maxAge(maxDelay time.Duration) time.Duration {
	if maxDelay == 0 {
		maxDelay = DefaultMaxDelay
	}
	return max(maxDelay/2, time.Microsecond)
}

// loadBatched loads the collection with batching, checking that the kernel
// can run the flush program on a given CPU (Linux 5.10); if it cannot, it
// loads it again without batching. It returns the batch length.
func loadBatched(opts Options, ringSize uint32, mode AttachMode, kernel *btf.Spec) (*ebpf.Collection, uint32, error) {
	batch := batchLen(ringSize, opts.MaxDelay)
	coll, err := loadCollection(opts, ringSize, mode, kernel, batch)
	if err != nil || batch == 1 {
		return coll, batch, err
	}
	_, err = flushOn(coll.Programs[captureProgObdFlush], 0)
	if err == nil || errors.Is(err, unix.ENXIO) { // ENXIO: CPU 0 is offline, yet it can
		return coll, batch, nil
	}
	coll.Close()
	if !errors.Is(err, ebpf.ErrNotSupported) && !errors.Is(err, unix.EINVAL) {
		return nil, 0, err
	}
	coll, err = loadCollection(opts, ringSize, mode, kernel, 1)
	return coll, 1, err
}

// loadCollection loads only the programs the mode and options need, so a
// kernel without the tp_btf hooks never sees (or rejects) those programs.
func loadCollection(opts Options, ringSize uint32, mode AttachMode, kernel *btf.Spec, batch uint32) (*ebpf.Collection, error) {
	spec, err := loadCapture()
	if err != nil {
		return nil, fmt.Errorf("bpf: parse embedded object: %w", err)
	}
	issue, complete := programNames(mode)
	for name := range spec.Programs {
		keep := name == issue || name == complete && opts.Completion || name == captureProgObdFlush && batch > 1
		if !keep {
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
	if err := spec.Variables[captureVarBatchLen].Set(batch); err != nil {
		return nil, fmt.Errorf("bpf: set batch_len: %w", err)
	}
	if err := spec.Variables[captureVarMaxAgeNs].Set(uint64(maxAge(opts.MaxDelay))); err != nil {
		return nil, fmt.Errorf("bpf: set max_age_ns: %w", err)
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

// Detach stops the program reporting new events, and makes Read return
// every event reported so far (flushing the CPUs' partial batches) and then
// io.EOF. The maps stay readable, so Lost still works; Close releases them.
// It waits for runs of the program in progress on other CPUs to end (an
// RCU grace period, typically milliseconds).
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
	if c.rd != nil && !c.detached.Load() {
		// Runs of the program that began before the links went may still
		// be staging events on other CPUs; Read's last flush must come
		// after them.
		if err := quiesce(); err != nil {
			errs = append(errs, err)
		}
		c.detached.Store(true)
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
