package record

import (
	"context"
	"errors"
	"fmt"
	"io"
	"syscall"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/obdtrace/obdtrace/snapshotter"
)

// killWait bounds the wait for a task's exit after SIGKILL: a task that
// outlives it is stuck in the kernel, and the cleanup goes on without it.
const killWait = 10 * time.Second

// recordContainer is the temporary container and its task.
type recordContainer struct {
	container containerd.Container
	task      containerd.Task
	exit      <-chan containerd.ExitStatus
	// started is when the task was started.
	started time.Time
}

// newRecordContainer creates the container id of img, whose active
// snapshot (key id) carries the labels asking the snapshotter to record
// into tracePath.
func newRecordContainer(ctx context.Context, client *containerd.Client, img containerd.Image, id, tracePath string, opts *Options) (*recordContainer, error) {
	specOpts := []oci.SpecOpts{oci.WithImageConfig(img)}
	if len(opts.Args) > 0 {
		specOpts = append(specOpts, oci.WithProcessArgs(opts.Args...))
	}
	if len(opts.Mounts) > 0 {
		specOpts = append(specOpts, oci.WithMounts(opts.Mounts))
	}
	specOpts = append(specOpts, networkOpts(opts.NetHost)...)
	labels := map[string]string{
		snapshotter.LabelRecordTrace:     "yes",
		snapshotter.LabelRecordTracePath: tracePath,
		LabelRecord:                      id,
	}
	c, err := client.NewContainer(ctx, id,
		containerd.WithImage(img),
		containerd.WithSnapshotter(opts.Snapshotter),
		containerd.WithNewSnapshot(id, img, snapshots.WithLabels(labels)),
		containerd.WithContainerLabels(map[string]string{LabelRecord: id}),
		containerd.WithNewSpec(specOpts...),
	)
	if err != nil {
		// The snapshot may exist without a container to own it.
		if rerr := client.SnapshotService(opts.Snapshotter).Remove(context.WithoutCancel(ctx), id); rerr != nil && !errdefs.IsNotFound(rerr) {
			err = errors.Join(err, fmt.Errorf("remove snapshot %s: %w", id, rerr))
		}
		return nil, fmt.Errorf("%w: create container %s of %s: %w", ErrContainer, id, img.Name(), err)
	}
	return &recordContainer{container: c}, nil
}

// networkOpts gives the container the host's network namespace, with its
// hosts and resolv.conf, or a new one.
func networkOpts(host bool) []oci.SpecOpts {
	if host {
		return []oci.SpecOpts{oci.WithHostNamespace(specs.NetworkNamespace), oci.WithHostHostsFile, oci.WithHostResolvconf}
	}
	// A namespace without a path is a new one; runc brings up its loopback
	// interface and nothing else.
	return []oci.SpecOpts{oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.NetworkNamespace})}
}

// start creates and starts the task, its output sent to stdout and stderr
// (discarded when nil).
func (c *recordContainer) start(ctx context.Context, stdout, stderr io.Writer) error {
	creator := cio.NullIO
	if stdout != nil || stderr != nil {
		creator = cio.NewCreator(cio.WithStreams(nil, orDiscard(stdout), orDiscard(stderr)))
	}
	task, err := c.container.NewTask(ctx, creator)
	if err != nil {
		return fmt.Errorf("%w: create task: %w", ErrContainer, err)
	}
	c.task = task
	// The wait must outlive a cancelled ctx: the exit is still needed to
	// stop the task cleanly.
	if c.exit, err = task.Wait(context.WithoutCancel(ctx)); err != nil {
		return fmt.Errorf("%w: wait for task: %w", ErrContainer, err)
	}
	c.started = time.Now()
	if err := task.Start(ctx); err != nil {
		return fmt.Errorf("%w: start task: %w", ErrContainer, err)
	}
	return nil
}

func orDiscard(w io.Writer) io.Writer {
	if w == nil {
		return io.Discard
	}
	return w
}

// stop ends the task: SIGTERM, then SIGKILL to all its processes after
// grace. It returns the task's exit status.
func (c *recordContainer) stop(ctx context.Context, grace time.Duration) (containerd.ExitStatus, error) {
	if err := c.task.Kill(ctx, syscall.SIGTERM); err != nil && !errdefs.IsNotFound(err) {
		return containerd.ExitStatus{}, fmt.Errorf("%w: SIGTERM: %w", ErrContainer, err)
	}
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case st := <-c.exit:
		return st, st.Error()
	case <-ctx.Done():
		return containerd.ExitStatus{}, context.Cause(ctx)
	case <-t.C:
	}
	if err := c.task.Kill(ctx, syscall.SIGKILL, containerd.WithKillAll); err != nil && !errdefs.IsNotFound(err) {
		return containerd.ExitStatus{}, fmt.Errorf("%w: SIGKILL: %w", ErrContainer, err)
	}
	t.Reset(killWait)
	select {
	case st := <-c.exit:
		return st, st.Error()
	case <-t.C:
		return containerd.ExitStatus{}, fmt.Errorf("%w: task still running %v after SIGKILL", ErrContainer, killWait)
	}
}

// remove deletes the task (killing it if it still runs), then the
// container with its snapshot. It is safe to call more than once.
func (c *recordContainer) remove(ctx context.Context) error {
	var errs []error
	if c.task != nil {
		if _, err := c.task.Delete(ctx, containerd.WithProcessKill); err != nil && !errdefs.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("delete task: %w", err))
		}
		c.task = nil
	}
	if c.container != nil {
		if err := c.container.Delete(ctx, containerd.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("delete container: %w", err))
		}
		c.container = nil
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w: %w", ErrContainer, err)
	}
	return nil
}
