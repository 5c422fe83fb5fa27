package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay/overlayutils"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/moby/locker"
	"github.com/rs/zerolog"
	bolt "go.etcd.io/bbolt"
)

// metadataLockTimeout bounds the wait for the metadata database's lock.
const metadataLockTimeout = 5 * time.Second

// Snapshotter implements containerd's snapshots.Snapshotter over overlayfs,
// with overlaybd images served by per-image backstore servers.
type Snapshotter struct {
	cfg  Config
	root string
	ms   *storage.MetaStore
	log  zerolog.Logger
	// overlayOpts are appended to every overlay mount.
	overlayOpts []string
	// serverCmd is the argv prefix of an image server.
	serverCmd []string
	// imageLocks serialise bringing an image's server up and tearing it
	// down, per overlaybd top layer ID.
	imageLocks *locker.Locker
	metrics    *metrics
	// stopWait bounds a removal's wait for its recording's trace;
	// 0 means stopRecordingTimeout (tests shorten it).
	stopWait time.Duration
}

var _ snapshots.Snapshotter = (*Snapshotter)(nil)

// New opens (or creates) the snapshotter's root, re-adopts the image
// servers still running from a previous run and tears down the ones nothing
// uses any more.
func New(ctx context.Context, cfg Config, log zerolog.Logger) (*Snapshotter, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	for _, dir := range []string{cfg.Root, filepath.Join(cfg.Root, "snapshots"), cfg.StateRoot} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("snapshotter: %w", err)
		}
	}
	supportsDType, err := fs.SupportsDType(cfg.Root)
	if err != nil {
		return nil, fmt.Errorf("snapshotter: %w", err)
	}
	if !supportsDType {
		return nil, fmt.Errorf("snapshotter: %s does not support d_type, which overlayfs needs", cfg.Root)
	}
	serverCmd := cfg.Server.Command
	if len(serverCmd) == 0 {
		self, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("snapshotter: find own executable for image servers: %w", err)
		}
		serverCmd = []string{self, "serve-image"}
	}
	// bolt waits forever for another process's lock on the file: a second
	// snapshotter on the same root must fail, not hang.
	ms, err := storage.NewMetaStore(filepath.Join(cfg.Root, "metadata.db"), func(o *bolt.Options) error {
		o.Timeout = metadataLockTimeout
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("snapshotter: open %s (in use by another snapshotter?): %w", cfg.Root, err)
	}
	s := &Snapshotter{
		cfg: cfg, root: cfg.Root, ms: ms, log: log,
		overlayOpts: overlayOptions(cfg.Root, log),
		serverCmd:   serverCmd,
		imageLocks:  locker.New(),
		metrics:     newMetrics(),
	}
	if err := s.recover(ctx); err != nil {
		ms.Close()
		return nil, err
	}
	return s, nil
}

// overlayOptions returns the options every overlay mount needs on this
// kernel, as containerd's overlay snapshotter chooses them.
func overlayOptions(root string, log zerolog.Logger) []string {
	var opts []string
	userxattr, err := overlayutils.NeedsUserXAttr(root)
	if err != nil {
		log.Warn().Err(err).Bool("userxattr", userxattr).Msg("cannot tell whether overlayfs needs userxattr")
	}
	if userxattr {
		opts = append(opts, "userxattr")
	}
	// Without index=off, an overlay whose lower layer was used by another
	// overlay mount refuses to mount again (its index no longer matches).
	if _, err := os.Stat("/sys/module/overlay/parameters/index"); err == nil {
		opts = append(opts, "index=off")
	}
	return opts
}

// Stat returns the info of an active or committed snapshot.
func (s *Snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	defer s.metrics.track(opStat)(&err)
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return info, err
}

// Update updates a snapshot's labels.
func (s *Snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (_ snapshots.Info, err error) {
	defer s.metrics.track(opUpdate)(&err)
	var updated snapshots.Info
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		updated, err = storage.UpdateInfo(ctx, info, fieldpaths...)
		return err
	})
	return updated, err
}

// Usage returns the disk space an active snapshot's upper directory takes,
// or the usage recorded when a snapshot was committed. A remote overlaybd
// layer takes no space of its own: its blocks live in the image's cache.
func (s *Snapshotter) Usage(ctx context.Context, key string) (_ snapshots.Usage, err error) {
	defer s.metrics.track(opUsage)(&err)
	var (
		id    string
		info  snapshots.Info
		usage snapshots.Usage
	)
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		id, info, usage, err = storage.GetInfo(ctx, key)
		return err
	}); err != nil {
		return snapshots.Usage{}, err
	}
	if info.Kind == snapshots.KindActive {
		du, err := fs.DiskUsage(ctx, s.upperPath(id))
		if err != nil {
			return snapshots.Usage{}, err
		}
		usage = snapshots.Usage(du)
	}
	return usage, nil
}

// Walk calls fn for each snapshot matching the filters.
func (s *Snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) (err error) {
	defer s.metrics.track(opWalk)(&err)
	return s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, fn, filters...)
	})
}

// Commit turns the active snapshot key into the committed snapshot name.
func (s *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) (err error) {
	defer s.metrics.track(opCommit)(&err)
	var image string
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		id, _, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		usage, err := fs.DiskUsage(ctx, s.upperPath(id))
		if err != nil {
			return err
		}
		if _, err := storage.CommitActive(ctx, key, name, snapshots.Usage(usage), opts...); err != nil {
			return fmt.Errorf("snapshotter: commit snapshot %s: %w", key, err)
		}
		// A committed snapshot is never mounted itself (its children are,
		// and they name the device they need), so it stops using one.
		rec, err := readRecord(s.snapshotDir(id))
		if err != nil {
			return err
		}
		if rec.Image != "" {
			image, rec.Image = rec.Image, ""
			return writeRecord(s.snapshotDir(id), rec)
		}
		return nil
	})
	if err == nil && image != "" {
		s.releaseImage(ctx, image)
	}
	return err
}

// Remove removes a snapshot. Its directory goes at once unless removal is
// asynchronous (then at Cleanup); the image device it used goes when no
// other snapshot uses it.
func (s *Snapshotter) Remove(ctx context.Context, key string) (err error) {
	defer s.metrics.track(opRemove)(&err)
	var (
		removals []string
		rec      record
	)
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		id, _, err := storage.Remove(ctx, key)
		if err != nil {
			return fmt.Errorf("snapshotter: remove snapshot %s: %w", key, err)
		}
		if rec, err = readRecord(s.snapshotDir(id)); err != nil {
			// The snapshot goes regardless; only its device may linger
			// until Cleanup.
			s.log.Warn().Err(err).Str("key", key).Msg("unreadable snapshot record")
		}
		if !s.cfg.AsyncRemove {
			removals, err = s.orphanDirs(ctx)
		}
		return err
	})
	if err != nil {
		return err
	}
	// The transaction is committed: failures from here on are logged, the
	// key is gone and Cleanup retries what is left.
	for _, dir := range removals {
		s.removeDir(ctx, dir)
	}
	if rec.Image != "" && rec.Recording != "" {
		s.stopRecording(ctx, rec.Image, rec.Recording)
	}
	if rec.Image != "" {
		s.releaseImage(ctx, rec.Image)
	}
	return nil
}

// Cleanup removes the directories of removed snapshots and tears down image
// servers that no snapshot uses.
func (s *Snapshotter) Cleanup(ctx context.Context) (err error) {
	defer s.metrics.track(opCleanup)(&err)
	var dirs []string
	if err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		dirs, err = s.orphanDirs(ctx)
		return err
	}); err != nil {
		return err
	}
	for _, dir := range dirs {
		s.removeDir(ctx, dir)
	}
	return s.reconcileServers(ctx, false)
}

// orphanDirs lists snapshot directories with no snapshot in the metadata.
// It must run in a transaction.
func (s *Snapshotter) orphanDirs(ctx context.Context) ([]string, error) {
	ids, err := idMap(ctx)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(s.root, "snapshots")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var orphans []string
	for _, e := range entries {
		if _, ok := ids[e.Name()]; ok {
			continue
		}
		orphans = append(orphans, filepath.Join(dir, e.Name()))
	}
	return orphans, nil
}

// removeDir removes a snapshot directory, first tearing down any image
// server that serves a mount inside it: a recursive removal must never
// walk into a mounted image.
func (s *Snapshotter) removeDir(ctx context.Context, dir string) {
	if strings.HasPrefix(filepath.Base(dir), "new-") {
		// A half-created snapshot: nothing was ever mounted in it.
		if err := os.RemoveAll(dir); err != nil {
			s.log.Warn().Err(err).Str("path", dir).Msg("remove snapshot directory")
		}
		return
	}
	if err := s.stopServer(ctx, filepath.Base(dir)); err != nil {
		s.log.Error().Err(err).Str("path", dir).Msg("tear down the image server of a removed snapshot; directory kept")
		return
	}
	if err := unmountUnder(dir); err != nil {
		s.log.Error().Err(err).Str("path", dir).Msg("unmount under a removed snapshot; directory kept")
		return
	}
	if err := os.RemoveAll(dir); err != nil {
		s.log.Warn().Err(err).Str("path", dir).Msg("remove snapshot directory")
	}
}

// Close closes the metadata store. Image servers keep running: the
// containers reading through them must not notice a snapshotter restart.
func (s *Snapshotter) Close() error {
	return s.ms.Close()
}

// idMap maps every snapshot ID to its key. It must run in a transaction.
func idMap(ctx context.Context) (map[string]string, error) {
	ids, err := storage.IDMap(ctx)
	if errdefs.IsNotFound(err) {
		return map[string]string{}, nil // a new store: no bucket before the first snapshot
	}
	return ids, err
}
