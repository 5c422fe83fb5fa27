package record

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/errdefs"
	"github.com/distribution/reference"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/obdtrace/obdtrace/recorder/image"
	"github.com/obdtrace/obdtrace/recorder/report"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
	"github.com/obdtrace/obdtrace/snapshotter/rpull"
	"github.com/obdtrace/obdtrace/trace"
)

// LabelRecord marks the container, its snapshot and the lease of one run;
// the value is the run's ID (also the container's ID and snapshot key).
const LabelRecord = "io.obdtrace.record"

// Defaults for the zero values of Options.
const (
	DefaultSnapshotter  = rpull.DefaultSnapshotter
	DefaultStopGrace    = 10 * time.Second
	DefaultTraceTimeout = time.Minute
)

const (
	// leaseExpiry lets containerd collect what a run that died without
	// cleaning up (kill -9) had created.
	leaseExpiry = time.Hour
	// cleanupTimeout bounds each cleanup step, which runs even when the
	// caller's context is cancelled.
	cleanupTimeout = time.Minute
)

// Errors returned (wrapped) by Run.
var (
	// ErrOptions reports options Run cannot act on.
	ErrOptions = errors.New("record: bad options")
	// ErrContainer reports a failure to create, start, stop or remove the
	// temporary container or its task.
	ErrContainer = errors.New("record: container")
	// ErrNotRecording means the snapshotter did not start recording when
	// the container's snapshot was prepared.
	ErrNotRecording = errors.New("record: the snapshotter is not recording")
	// ErrNoTrace means the recording produced no usable trace.
	ErrNoTrace = errors.New("record: no trace")
	// ErrTraceMismatch means the trace names other layers than the image.
	ErrTraceMismatch = errors.New("record: trace does not match the image")
	// ErrStopped means Options.Stop was closed before the container
	// started: there was nothing to record.
	ErrStopped = errors.New("record: stopped before the container started")
)

// Options configure a run. Image, NewImage and Duration are required.
type Options struct {
	// Image is the image to record, pulled (with rpull) when containerd
	// lacks it or it is not unpacked into Snapshotter.
	Image string
	// NewImage names the image created: Image with the new trace layer as
	// its last layer, any old trace layer removed.
	NewImage string
	// Args replace the image's entrypoint and command when set.
	Args []string
	// Mounts are added to the container's (see ParseMount).
	Mounts []specs.Mount
	// Duration is how long the container runs while recorded.
	Duration time.Duration
	// Stop, when closed, ends the recording early (the run goes on to build
	// the image; closed before the container starts, it aborts the run with
	// ErrStopped); cancelling Run's context aborts it in any case.
	Stop <-chan struct{}
	// Snapshotter is the project's snapshotter's name in containerd.
	Snapshotter string
	// NetHost shares the host's network namespace; by default the container
	// has its own, with loopback only.
	NetHost bool
	// StopGrace is how long the task has to exit after SIGTERM.
	StopGrace time.Duration
	// TraceTimeout bounds the wait for the snapshotter's trace.
	TraceTimeout time.Duration
	// TraceDir is where the trace file is made ("" = os.TempDir()); the
	// snapshotter, on this host, must be able to write there.
	TraceDir string
	// Push pushes NewImage to its registry.
	Push bool
	// PlainHTTP talks plain HTTP to the registries of Image and NewImage.
	PlainHTTP bool
	// DockerConfigDir holds registry credentials ("" = $DOCKER_CONFIG or
	// ~/.docker).
	DockerConfigDir string
	// Stdout and Stderr receive the container's output (nil: discarded).
	Stdout, Stderr io.Writer
	// Progress, when set, receives a line per step.
	Progress io.Writer
}

func (o *Options) normalize() error {
	if o.Duration <= 0 {
		return fmt.Errorf("%w: duration %v, want > 0", ErrOptions, o.Duration)
	}
	for _, r := range []*string{&o.Image, &o.NewImage} {
		named, err := reference.ParseDockerRef(*r)
		if err != nil {
			return fmt.Errorf("%w: image reference %q: %w", ErrOptions, *r, err)
		}
		*r = named.String()
	}
	if o.Snapshotter == "" {
		o.Snapshotter = DefaultSnapshotter
	}
	if o.StopGrace <= 0 {
		o.StopGrace = DefaultStopGrace
	}
	if o.TraceTimeout <= 0 {
		o.TraceTimeout = DefaultTraceTimeout
	}
	return nil
}

// StopReason says what ended a recording.
type StopReason string

// Stop reasons.
const (
	StopDuration  StopReason = "duration"  // Options.Duration passed
	StopRequested StopReason = "requested" // Options.Stop was closed
	StopExited    StopReason = "exited"    // the task exited on its own
)

// Summary says what a run did.
type Summary struct {
	// ID is the run's container ID, snapshot key and lease ID.
	ID       string `json:"id"`
	Image    string `json:"image"`
	NewImage string `json:"new_image"`
	// Recorded is how long the task ran before it was stopped or exited.
	Recorded time.Duration `json:"recorded_ns"`
	Stopped  StopReason    `json:"stopped"`
	// ExitCode is the task's exit status.
	ExitCode uint32 `json:"exit_code"`
	// Trace describes the recorded trace: frames, unique bytes per layer.
	Trace *report.Summary `json:"trace"`
	// Lost is the number of block requests the capture dropped, when the
	// snapshotter reported it.
	Lost *uint64 `json:"lost,omitempty"`
	// Manifest is NewImage's manifest; Layer its trace layer; Replaced the
	// trace layer it had before, if any.
	Manifest ocispec.Descriptor  `json:"manifest"`
	Layer    ocispec.Descriptor  `json:"layer"`
	Replaced *ocispec.Descriptor `json:"replaced,omitempty"`
	Pushed   bool                `json:"pushed"`
}

// Run records Image's start in a temporary container and creates NewImage
// with the trace; see the package documentation. Whatever it created in
// containerd is gone when it returns, except NewImage (and Image, if it
// pulled it).
func Run(ctx context.Context, client *containerd.Client, opts Options) (sum *Summary, err error) {
	if err := opts.normalize(); err != nil {
		return nil, err
	}
	id, err := newID()
	if err != nil {
		return nil, err
	}
	p := progress{opts.Progress}
	ctx, endLease, err := withLease(ctx, client, id)
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, endLease()) }()

	img, err := ensureImage(ctx, client, &opts, p)
	if err != nil {
		return nil, err
	}
	tf, err := newTraceFile(opts.TraceDir)
	if err != nil {
		return nil, err
	}
	defer tf.remove()

	sum = &Summary{ID: id, Image: opts.Image, NewImage: opts.NewImage}
	t, err := recordTrace(ctx, client, img, tf, &opts, sum, p)
	if err != nil {
		return nil, err
	}
	if err := buildImage(ctx, client, t, &opts, sum, p); err != nil {
		return nil, err
	}
	if opts.Push {
		if err := push(ctx, client, &opts, sum.Manifest); err != nil {
			return nil, err
		}
		sum.Pushed = true
		p.printf("pushed %s\n", opts.NewImage)
	}
	return sum, nil
}

func newID() (string, error) {
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("record: run ID: %w", err)
	}
	return "obd-record-" + hex.EncodeToString(b), nil
}

// withLease puts everything the run creates in containerd under a lease
// named id, and returns a function that deletes it (with what only it
// holds: the active snapshot, content not referenced by an image).
func withLease(ctx context.Context, client *containerd.Client, id string) (context.Context, func() error, error) {
	ls := client.LeasesService()
	l, err := ls.Create(ctx, leases.WithID(id), leases.WithExpiration(leaseExpiry),
		leases.WithLabels(map[string]string{LabelRecord: id}))
	if err != nil {
		return ctx, nil, fmt.Errorf("record: create lease: %w", err)
	}
	end := func() error {
		cctx, cancel := cleanupContext(ctx)
		defer cancel()
		if err := ls.Delete(cctx, l); err != nil && !errdefs.IsNotFound(err) {
			return fmt.Errorf("record: delete lease %s: %w", id, err)
		}
		return nil
	}
	return leases.WithLease(ctx, id), end, nil
}

// cleanupContext is ctx without its cancellation, bounded by cleanupTimeout:
// cleanup must run after a Ctrl-C too.
func cleanupContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
}

// ensureImage returns Image, pulled into the snapshotter first when needed.
func ensureImage(ctx context.Context, client *containerd.Client, opts *Options, p progress) (containerd.Image, error) {
	img, err := client.GetImage(ctx, opts.Image)
	switch {
	case err == nil:
		unpacked, err := img.IsUnpacked(ctx, opts.Snapshotter)
		if err != nil {
			return nil, fmt.Errorf("record: image %s: %w", opts.Image, err)
		}
		if unpacked {
			return img, nil
		}
	case !errdefs.IsNotFound(err):
		return nil, fmt.Errorf("record: image %s: %w", opts.Image, err)
	}
	p.printf("pulling %s into snapshotter %s\n", opts.Image, opts.Snapshotter)
	res, err := rpull.Pull(ctx, client, opts.Image, rpull.Options{
		Snapshotter: opts.Snapshotter, PlainHTTP: opts.PlainHTTP, DockerConfigDir: opts.DockerConfigDir, Progress: opts.Progress,
	})
	if err != nil {
		return nil, err
	}
	return res.Image, nil
}

// recordTrace runs the container while the snapshotter records it, and
// returns the trace.
func recordTrace(ctx context.Context, client *containerd.Client, img containerd.Image, tf traceFile, opts *Options, sum *Summary, p progress) (*trace.Trace, error) {
	c, err := newRecordContainer(ctx, client, img, sum.ID, string(tf), opts)
	if err != nil {
		return nil, err
	}
	// Whatever happens below, the recording stops and the container goes.
	remove := func() error {
		cctx, cancel := cleanupContext(ctx)
		defer cancel()
		return errors.Join(tf.stopRecording(), c.remove(cctx))
	}
	defer remove()
	if !tf.recording() {
		return nil, fmt.Errorf("%w: no %s after the container's snapshot was prepared: is %s an overlaybd image, "+
			"is %q this project's snapshotter, and does it run on this host? Its log says why", ErrNotRecording,
			tf.lock(), opts.Image, opts.Snapshotter)
	}
	select {
	case <-opts.Stop:
		return nil, ErrStopped
	default:
	}
	if err := c.start(ctx, opts.Stdout, opts.Stderr); err != nil {
		return nil, err
	}
	p.printf("container %s started: recording for %v (stop early: Ctrl-C)\n", sum.ID, opts.Duration)
	if err := runFor(ctx, c, opts, sum); err != nil {
		return nil, err
	}
	p.printf("container stopped (%s) after %v, exit code %d; waiting for the trace\n",
		sum.Stopped, roundDuration(sum.Recorded), sum.ExitCode)
	if err := remove(); err != nil {
		return nil, err
	}
	if err := tf.wait(ctx, opts.TraceTimeout); err != nil {
		return nil, err
	}
	t, stats, err := tf.read()
	if err != nil {
		return nil, err
	}
	t.Meta.Source = trace.SourceCLI
	sum.Lost = stats.Lost
	sum.Trace = report.Summarize(t)
	return t, nil
}

// runFor lets the task run until the duration passes, Stop is closed or it
// exits, then stops it.
func runFor(ctx context.Context, c *recordContainer, opts *Options, sum *Summary) error {
	timer := time.NewTimer(opts.Duration - time.Since(c.started))
	defer timer.Stop()
	select {
	case st := <-c.exit:
		sum.Recorded, sum.Stopped, sum.ExitCode = time.Since(c.started), StopExited, st.ExitCode()
		return st.Error()
	case <-timer.C:
		sum.Stopped = StopDuration
	case <-opts.Stop:
		sum.Stopped = StopRequested
	case <-ctx.Done():
		return context.Cause(ctx)
	}
	sum.Recorded = time.Since(c.started)
	st, err := c.stop(ctx, opts.StopGrace)
	sum.ExitCode = st.ExitCode()
	return err
}

// buildImage writes NewImage into containerd: Image with t as its trace
// layer.
func buildImage(ctx context.Context, client *containerd.Client, t *trace.Trace, opts *Options, sum *Summary, p progress) error {
	store := &ContainerdStore{Content: client.ContentStore(), Images: client.ImageService()}
	if err := checkLayers(ctx, store, opts.Image, t); err != nil {
		return err
	}
	res, err := image.AddTraceLayer(ctx, store, opts.Image, opts.NewImage, t, image.UpdateOptions{Created: time.Now()})
	if err != nil {
		return fmt.Errorf("record: create %s: %w", opts.NewImage, err)
	}
	sum.Manifest, sum.Layer, sum.Replaced = res.Manifest, res.Layer, res.Replaced
	what := "added"
	if res.Replaced != nil {
		what = "replaced " + res.Replaced.Digest.String()
	}
	p.printf("created %s (%s): trace layer %s %s\n", opts.NewImage, res.Manifest.Digest, res.Layer.Digest, what)
	return nil
}

// checkLayers makes sure t was recorded on ref's layers: its layers, bottom
// first, end with the image's (trace layer aside). A trace may name one
// more layer beneath them, the local baselayer an image converted onto it
// is served on.
func checkLayers(ctx context.Context, s image.Store, ref string, t *trace.Trace) error {
	desc, err := s.ResolveManifest(ctx, ref)
	if err != nil {
		return err
	}
	data, err := image.ReadVerified(ctx, s, desc, image.MaxManifestSize)
	if err != nil {
		return fmt.Errorf("record: manifest of %s: %w", ref, err)
	}
	m, err := image.ParseManifest(data)
	if err != nil {
		return fmt.Errorf("record: manifest of %s: %w", ref, err)
	}
	var want []ocispec.Descriptor
	for _, l := range m.Layers {
		if !image.IsTraceLayer(l) {
			want = append(want, l)
		}
	}
	extra := len(t.Layers) - len(want)
	if extra < 0 || extra > 1 {
		return fmt.Errorf("%w: the trace names %d layers, %s has %d", ErrTraceMismatch, len(t.Layers), ref, len(want))
	}
	for i, l := range want {
		if got := t.Layers[extra+i].Digest; got != l.Digest {
			return fmt.Errorf("%w: trace layer %d is %s, %s's layer %d is %s", ErrTraceMismatch, extra+i, got, ref, i, l.Digest)
		}
	}
	return nil
}

// push pushes NewImage to its registry, reading what the registry lacks
// from containerd or from Image's repository.
func push(ctx context.Context, client *containerd.Client, opts *Options, desc ocispec.Descriptor) error {
	from, err := reference.ParseDockerRef(opts.Image)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrOptions, err)
	}
	to, err := reference.ParseDockerRef(opts.NewImage)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrOptions, err)
	}
	ropts := registry.Options{DockerConfigDir: opts.DockerConfigDir}
	if opts.PlainHTTP {
		ropts.PlainHTTP = []string{reference.Domain(from), reference.Domain(to)}
	}
	rc, err := registry.New(ropts)
	if err != nil {
		return err
	}
	dst, err := rc.Store(opts.NewImage)
	if err != nil {
		return err
	}
	src, err := rc.Store(opts.Image)
	if err != nil {
		return err
	}
	local := &ContainerdStore{Content: client.ContentStore(), Images: client.ImageService()}
	return pushImage(ctx, dst, opts.NewImage, desc, from, local, src)
}

// roundDuration rounds d for people: to the millisecond, or to the
// microsecond under a second (a task that exits at once).
func roundDuration(d time.Duration) time.Duration {
	if d < time.Second {
		return d.Round(time.Microsecond)
	}
	return d.Round(time.Millisecond)
}

// progress prints a line per step when it has a writer.
type progress struct{ w io.Writer }

func (p progress) printf(format string, args ...any) {
	if p.w != nil {
		fmt.Fprintf(p.w, format, args...)
	}
}
