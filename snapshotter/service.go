package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/snapshots"
	"google.golang.org/grpc"
)

// stopTimeout bounds a graceful stop of the gRPC server before in-flight
// calls are cut.
const stopTimeout = 10 * time.Second

// Listen opens the unix socket containerd connects to, readable and
// writable by its owner only. A stale socket left by a killed snapshotter
// is replaced; a live one is an error.
func Listen(address string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return nil, fmt.Errorf("snapshotter: socket directory: %w", err)
	}
	if c, err := net.DialTimeout("unix", address, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("snapshotter: %s is already served by another process", address)
	}
	if err := os.Remove(address); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("snapshotter: remove stale socket: %w", err)
	}
	ln, err := net.Listen("unix", address)
	if err != nil {
		return nil, fmt.Errorf("snapshotter: listen: %w", err)
	}
	if err := os.Chmod(address, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("snapshotter: socket mode: %w", err)
	}
	return ln, nil
}

// Serve serves sn as containerd's snapshot API on ln until ctx ends, then
// stops gracefully (in-flight calls get stopTimeout to finish).
func Serve(ctx context.Context, ln net.Listener, sn snapshots.Snapshotter) error {
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("snapshotter: serve: %w", err)
	case <-ctx.Done():
	}
	stopped := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(stopTimeout):
		srv.Stop()
	}
	return nil
}
