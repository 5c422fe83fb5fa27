package snapshotter

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/distribution/reference"
	"github.com/moby/locker"
	"github.com/moby/sys/mountinfo"
	"github.com/opencontainers/go-digest"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/snapshotter/backstore"
)

// ErrImageServer is wrapped when an image's backstore server cannot be
// brought up.
var ErrImageServer = errors.New("snapshotter: image server")

// ensureImage makes sure the device of the overlaybd chain topped by layer
// id is served and mounted, starting its server when there is none and
// replacing one that died. A server started now records into or replays
// trace (see traceRequest), asked for by the snapshot key. It reports
// whether a recording into trace started for this request: only then is
// the recording this snapshot's to stop (another snapshot's recording
// into the same path is refused and must outlive this one).
func (s *Snapshotter) ensureImage(ctx context.Context, id, key, trace string) (recording bool, err error) {
	s.imageLocks.Lock(id)
	defer s.imageLocks.Unlock(id)
	mp := s.imageMountpoint(id)
	st, _, err := backstore.ReadState(s.cfg.StateRoot, mp)
	switch {
	case err == nil:
		mounted, _ := mountinfo.Mounted(mp)
		if serverAlive(st) && mounted {
			if trace != "" {
				recording = s.traceOnAttached(ctx, st, id, key, trace)
			}
			return recording, nil
		}
		s.log.Warn().Str("image", id).Int("pid", st.PID).Bool("mounted", mounted).
			Msg("image server gone: cleaning up before starting a new one")
		if err := backstore.Teardown(ctx, s.cfg.StateRoot, mp, s.cfg.Server.StopGrace); err != nil {
			return false, fmt.Errorf("%w: clean up after the dead server of image %s: %w", ErrImageServer, id, err)
		}
	case !errors.Is(err, backstore.ErrNotMounted):
		return false, fmt.Errorf("%w: state of image %s: %w", ErrImageServer, id, err)
	}
	// Asked before the start, as the server decides: a server started with
	// a trace to record is recording once it is up (it starts recording
	// before it mounts), and the file stays empty until the recording ends.
	mode, _ := backstore.TraceModeOf(trace)
	if err := s.startServer(ctx, id, trace); err != nil {
		return false, err
	}
	return mode == backstore.TraceRecord, nil
}

// traceOnAttached asks the running server of image id to record into or
// replay trace for the container snapshot key, and reports whether a
// recording started. Recording on a device other containers read records
// their reads too.
func (s *Snapshotter) traceOnAttached(ctx context.Context, st backstore.State, id, key, trace string) bool {
	mode, err := backstore.TraceModeOf(trace)
	req := backstore.ControlRequest{Op: backstore.OpReplay, Path: trace}
	if mode == backstore.TraceRecord {
		req = backstore.ControlRequest{Op: backstore.OpRecord, Path: trace, MaxDuration: s.cfg.Record.MaxDuration}
	}
	if err == nil && mode == backstore.TraceOff {
		err = errors.New("the trace file is gone")
	}
	if err == nil {
		err = backstore.SendControl(ctx, st, req)
	}
	if err != nil {
		reason := reasonServer
		if errors.Is(err, backstore.ErrReplayRunning) {
			reason = reasonBusy
		}
		s.traceLabelProblem(key, trace, reason, fmt.Errorf("device already attached: %w", err))
		return false
	}
	s.log.Info().Str("image", id).Str("key", key).Str("op", req.Op).Str("trace", trace).
		Msg("trace request sent to the running image server")
	return req.Op == backstore.OpRecord
}

// stopRecordingTimeout bounds how long a snapshot's removal waits for its
// recording's trace: Remove runs inside containerd's garbage collector,
// which must not stall on a slow trace write. The server finishes the
// trace regardless.
const stopRecordingTimeout = 10 * time.Second

// stopRecording ends the recording a removed container snapshot asked for
// on image id, if it still runs. Once the server stops, so does the
// recording: then there is nothing to do.
func (s *Snapshotter) stopRecording(ctx context.Context, id, trace string) {
	st, _, err := backstore.ReadState(s.cfg.StateRoot, s.imageMountpoint(id))
	if err != nil || !serverAlive(st) {
		return
	}
	wait := cmp.Or(s.stopWait, stopRecordingTimeout)
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	err = backstore.SendControl(ctx, st, backstore.ControlRequest{Op: backstore.OpStopRecord, Path: trace})
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		s.log.Warn().Err(err).Str("image", id).Str("trace", trace).Dur("waited", wait).
			Msg("stop-record not answered in time: the image server finishes the trace if the request reached it, else the recording ends with the device or its max duration")
	case errors.Is(err, backstore.ErrNotRecording):
		s.log.Debug().Str("image", id).Str("trace", trace).Msg("recording already ended")
	case err != nil:
		s.log.Warn().Err(err).Str("image", id).Str("trace", trace).Msg("stop recording")
	default:
		s.log.Info().Str("image", id).Str("trace", trace).Msg("recording stopped with its container's snapshot")
	}
}

// startServer spawns the backstore server of image id and waits until its
// filesystem is mounted.
func (s *Snapshotter) startServer(ctx context.Context, id, trace string) error {
	rec, err := readRecord(s.snapshotDir(id))
	if err != nil {
		return err
	}
	if rec.Layer == nil {
		return fmt.Errorf("%w: snapshot %s is not an overlaybd layer", ErrImageServer, id)
	}
	ref, err := pinRef(rec.Layer.Ref, rec.Layer.Manifest)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrImageServer, err)
	}
	dir := s.blockDir(id)
	if err := os.MkdirAll(s.imageMountpoint(id), 0o755); err != nil {
		return fmt.Errorf("%w: %w", ErrImageServer, err)
	}
	spec := ServerSpec{
		Ref: ref, Chain: rec.Layer.Chain,
		Mountpoint: s.imageMountpoint(id), StateRoot: s.cfg.StateRoot,
		CacheDir: filepath.Join(dir, "cache"), Cache: s.cfg.Cache, Device: s.cfg.Device,
		Baselayer: s.cfg.Baselayer, Registry: s.cfg.Registry, Replay: s.cfg.Replay,
		StatsInterval: s.cfg.Server.StatsInterval, MetricsAddress: s.cfg.Server.MetricsAddress,
		LogLevel:  s.cfg.LogLevel,
		TraceFile: trace, RecordMaxDuration: s.cfg.Record.MaxDuration,
	}
	spec.Replay.FullFetch = spec.Replay.FullFetch || rec.Layer.FullFetch
	specPath := filepath.Join(dir, "server.json")
	if err := writeServerSpec(specPath, spec); err != nil {
		return fmt.Errorf("%w: %w", ErrImageServer, err)
	}
	argv := append(slices.Clone(s.serverCmd), "--spec", specPath)
	start := time.Now()
	err = backstore.Spawn(ctx, argv, filepath.Join(dir, "server.log"), s.cfg.Server.ReadyTimeout)
	s.metrics.serverStart.Observe(time.Since(start).Seconds())
	if err != nil {
		s.metrics.serverFailures.Inc()
		return fmt.Errorf("%w: image %s (%s): %w", ErrImageServer, id, ref, err)
	}
	s.log.Info().Str("image", id).Str("ref", ref).Str("mountpoint", spec.Mountpoint).
		Dur("took", time.Since(start)).Msg("image server started")
	return nil
}

// pinRef returns ref pinned to the manifest digest the pull saw, so that a
// tag moved since the pull cannot change what the device serves.
func pinRef(ref string, manifest digest.Digest) (string, error) {
	named, err := reference.ParseDockerRef(ref)
	if err != nil {
		return "", fmt.Errorf("image reference %q: %w", ref, err)
	}
	if manifest == "" {
		return named.String(), nil
	}
	pinned, err := reference.WithDigest(reference.TrimNamed(named), manifest)
	if err != nil {
		return "", fmt.Errorf("image reference %q with manifest %s: %w", ref, manifest, err)
	}
	return pinned.String(), nil
}

// releaseImage tears down the server of image id unless a snapshot still
// uses it. Failures are logged: Cleanup retries.
func (s *Snapshotter) releaseImage(ctx context.Context, id string) {
	s.imageLocks.Lock(id)
	defer s.imageLocks.Unlock(id)
	users, err := s.usersOf(ctx, id)
	if err != nil {
		s.log.Error().Err(err).Str("image", id).Msg("find the users of an image device")
		return
	}
	if len(users) > 0 {
		return
	}
	if err := s.stopServerLocked(ctx, id); err != nil {
		s.log.Error().Err(err).Str("image", id).Msg("tear down image server")
	}
}

// stopServer tears down whatever serves image id.
func (s *Snapshotter) stopServer(ctx context.Context, id string) error {
	s.imageLocks.Lock(id)
	defer s.imageLocks.Unlock(id)
	return s.stopServerLocked(ctx, id)
}

func (s *Snapshotter) stopServerLocked(ctx context.Context, id string) error {
	mp := s.imageMountpoint(id)
	start := time.Now()
	err := backstore.Teardown(ctx, s.cfg.StateRoot, mp, s.cfg.Server.StopGrace)
	switch {
	case errors.Is(err, backstore.ErrNotMounted):
		return nil
	case err != nil:
		return err
	}
	s.log.Info().Str("image", id).Dur("took", time.Since(start)).Msg("image server stopped")
	return nil
}

// usersOf returns the snapshots whose mounts read image id's device.
func (s *Snapshotter) usersOf(ctx context.Context, id string) ([]string, error) {
	var users []string
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		ids, err := idMap(ctx)
		if err != nil {
			return err
		}
		for sid, key := range ids {
			rec, err := readRecord(s.snapshotDir(sid))
			if err != nil {
				return err
			}
			if rec.Image == id {
				users = append(users, key)
			}
		}
		return nil
	})
	return users, err
}

// recover runs at start-up: it removes directories of snapshots that no
// longer exist and reconciles the image servers with the snapshots.
func (s *Snapshotter) recover(ctx context.Context) error {
	var dirs []string
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		dirs, err = s.orphanDirs(ctx)
		return err
	}); err != nil {
		return err
	}
	for _, dir := range dirs {
		s.removeDir(ctx, dir)
	}
	return s.reconcileServers(ctx, true)
}

// reconcileServers looks at every image server recorded under the state
// root for a mount in this snapshotter's root: live ones with users are
// adopted, the others torn down. A dead server of a used image is only
// cleaned up; the next Prepare or Mounts of one of its snapshots starts a
// new one (its running containers lost their device with it).
func (s *Snapshotter) reconcileServers(ctx context.Context, atStart bool) error {
	entries, err := os.ReadDir(filepath.Join(s.root, "snapshots"))
	if err != nil {
		return fmt.Errorf("snapshotter: %w", err)
	}
	var errs []error
	for _, e := range entries {
		id := e.Name()
		if _, err := strconv.ParseUint(id, 10, 64); err != nil {
			continue
		}
		st, _, err := backstore.ReadState(s.cfg.StateRoot, s.imageMountpoint(id))
		if errors.Is(err, backstore.ErrNotMounted) {
			continue
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if err := s.reconcileServer(ctx, id, st, atStart); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (s *Snapshotter) reconcileServer(ctx context.Context, id string, st backstore.State, atStart bool) error {
	s.imageLocks.Lock(id)
	defer s.imageLocks.Unlock(id)
	users, err := s.usersOf(ctx, id)
	if err != nil {
		return err
	}
	alive := serverAlive(st)
	log := s.log.With().Str("image", id).Str("ref", st.Ref).Int("pid", st.PID).Int("users", len(users)).Logger()
	switch {
	case len(users) > 0 && alive:
		if atStart {
			s.metrics.adopted.Inc()
			log.Info().Msg("image server adopted")
		}
		return nil
	case len(users) > 0:
		log.Error().Msg("image server died: its running containers lost their device; cleaning up")
	default:
		log.Info().Bool("alive", alive).Msg("image server without users: tearing down")
	}
	return s.stopServerLocked(ctx, id)
}

// unmountUnder unmounts every mount at or below dir, deepest first.
func unmountUnder(dir string) error {
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return err
	}
	slices.SortFunc(mounts, func(a, b *mountinfo.Info) int { return len(b.Mountpoint) - len(a.Mountpoint) })
	var errs []error
	for _, m := range mounts {
		if err := unix.Unmount(m.Mountpoint, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", m.Mountpoint, err))
		}
	}
	return errors.Join(errs...)
}

// serverAlive tells whether the process a state record names still runs:
// same PID, same start time (a reused PID is another process), not a
// zombie.
func serverAlive(st backstore.State) bool {
	if st.PID <= 0 {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(st.PID) + "/stat")
	if err != nil {
		return false
	}
	// The command name (field 2) may hold spaces; fields resume after ')'.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 || f[0] == "Z" || f[0] == "X" {
		return false
	}
	start, err := strconv.ParseUint(f[19], 10, 64)
	return err == nil && start == st.PIDStart
}

// StopServers tears down every image server of the snapshotter rooted at
// cfg.Root, without opening its metadata: for use once the snapshotter is
// stopped for good (the servers outlive it on purpose).
func StopServers(ctx context.Context, cfg Config, log zerolog.Logger) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	s := &Snapshotter{cfg: cfg, root: cfg.Root, log: log, imageLocks: locker.New()}
	entries, err := os.ReadDir(filepath.Join(cfg.Root, "snapshots"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("snapshotter: %w", err)
	}
	var errs []error
	for _, e := range entries {
		if err := s.stopServer(ctx, e.Name()); err != nil {
			errs = append(errs, fmt.Errorf("image %s: %w", e.Name(), err))
		}
	}
	return errors.Join(errs...)
}
