package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/obdtrace/obdtrace/snapshotter/backstore"
)

// ErrNoImageRef means an overlaybd layer came without the label naming the
// image it belongs to, so its blocks cannot be fetched on demand.
var ErrNoImageRef = errors.New("snapshotter: overlaybd layer without an image reference label")

// Prepare creates an active snapshot. An overlaybd layer being pulled is
// committed at once under its target name (the remote-snapshot protocol);
// a snapshot on top of an overlaybd chain gets the image's device.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) (_ []mount.Mount, err error) {
	defer s.metrics.track(opPrepare)(&err)
	var base snapshots.Info
	for _, opt := range opts {
		if err := opt(&base); err != nil {
			return nil, err
		}
	}
	if target := base.Labels[LabelSnapshotRef]; target != "" && base.Labels[LabelBlobDigest] != "" {
		handled, err := s.prepareRemote(ctx, key, parent, target, base.Labels)
		if handled || err != nil {
			return nil, err
		}
	}
	return s.createSnapshot(ctx, snapshots.KindActive, key, parent, opts)
}

// View creates a read-only snapshot of parent.
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) (_ []mount.Mount, err error) {
	defer s.metrics.track(opView)(&err)
	return s.createSnapshot(ctx, snapshots.KindView, key, parent, opts)
}

// Mounts returns the mounts of an active or view snapshot, bringing its
// image's server back up if it is gone.
func (s *Snapshotter) Mounts(ctx context.Context, key string) (_ []mount.Mount, err error) {
	defer s.metrics.track(opMounts)(&err)
	var (
		snap storage.Snapshot
		info snapshots.Info
		rec  record
	)
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		if snap, err = storage.GetSnapshot(ctx, key); err != nil {
			return fmt.Errorf("snapshotter: get active mount: %w", err)
		}
		if _, info, _, err = storage.GetInfo(ctx, key); err != nil {
			return fmt.Errorf("snapshotter: get snapshot info: %w", err)
		}
		rec, err = readRecord(s.snapshotDir(snap.ID))
		return err
	}); err != nil {
		return nil, err
	}
	if rec.Image != "" {
		if _, err := s.ensureImage(ctx, rec.Image, key, ""); err != nil {
			return nil, err
		}
	}
	return s.mounts(snap, info)
}

// prepareRemote implements the remote-snapshot protocol for an overlaybd
// layer: it commits the layer under target without content and answers
// "already exists", so containerd downloads and applies nothing. handled
// is false when the layer cannot be remote (its parent is an ordinary
// layer): it is then unpacked like any other.
func (s *Snapshotter) prepareRemote(ctx context.Context, key, parent, target string, labels map[string]string) (handled bool, err error) {
	layer, err := layerFromLabels(labels)
	if err != nil {
		return false, err
	}
	blob, ref := layer.Blob, layer.Ref
	var td string
	defer func() {
		if td != "" {
			os.RemoveAll(td)
		}
	}()
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		var parentChain []digest.Digest
		if parent != "" {
			pid, _, _, err := storage.GetInfo(ctx, parent)
			if err != nil {
				return fmt.Errorf("snapshotter: parent %s: %w", parent, err)
			}
			prec, err := readRecord(s.snapshotDir(pid))
			if err != nil {
				return err
			}
			if prec.Layer == nil {
				s.log.Warn().Str("key", key).Str("parent", parent).Stringer("blob", blob).
					Msg("overlaybd layer above an ordinary layer: unpacking it instead")
				return nil
			}
			parentChain = prec.Layer.Chain
		}
		layer.Chain = append(slices.Clone(parentChain), blob)
		handled = true
		if td, err = s.newSnapshotDir(snapshots.KindView); err != nil {
			return err
		}
		snap, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent, snapshots.WithLabels(labels))
		if err != nil {
			return fmt.Errorf("snapshotter: create snapshot: %w", err)
		}
		if err := writeRecord(td, record{Layer: layer}); err != nil {
			return err
		}
		committed := make(map[string]string, len(labels)+1)
		for k, v := range labels {
			committed[k] = v
		}
		committed[LabelRemote] = labelRemoteVal
		if _, err := storage.CommitActive(ctx, key, target, snapshots.Usage{}, snapshots.WithLabels(committed)); err != nil {
			return fmt.Errorf("snapshotter: commit remote snapshot %s: %w", target, err)
		}
		if err := os.Rename(td, s.snapshotDir(snap.ID)); err != nil {
			return fmt.Errorf("snapshotter: %w", err)
		}
		td = ""
		return nil
	})
	if err != nil || !handled {
		return false, err
	}
	s.log.Info().Str("target", target).Str("ref", ref).Stringer("blob", blob).Bool("trace_layer", layer.Trace).
		Int("depth", len(layer.Chain)).Msg("remote overlaybd layer committed")
	return true, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
}

// layerFromLabels reads what the pull says about an overlaybd layer: its
// blob, the image it belongs to and how to serve it. Labels come from the
// image's annotations, so anything in them may be malformed.
func layerFromLabels(labels map[string]string) (*layerRecord, error) {
	blob, err := digest.Parse(labels[LabelBlobDigest])
	if err != nil {
		return nil, fmt.Errorf("snapshotter: label %s %q: %w: %w", LabelBlobDigest, labels[LabelBlobDigest], errdefs.ErrInvalidArgument, err)
	}
	ref := labels[LabelImageRef]
	if ref == "" {
		ref = labels[LabelCRIImageRef]
	}
	if ref == "" {
		return nil, fmt.Errorf("%w (%s or %s) on layer %s: pull with `obdctl rpull` or enable remote snapshot annotations: %w",
			ErrNoImageRef, LabelImageRef, LabelCRIImageRef, blob, errdefs.ErrInvalidArgument)
	}
	layer := &layerRecord{
		Blob: blob, Ref: ref,
		Trace:     labels[LabelAccelerationLayer] == "yes",
		FullFetch: labels[LabelDownloadRemoteBlob] == "download",
	}
	if m := labels[LabelCRIManifestDigest]; m != "" {
		if layer.Manifest, err = digest.Parse(m); err != nil {
			return nil, fmt.Errorf("snapshotter: label %s %q: %w: %w", LabelCRIManifestDigest, m, errdefs.ErrInvalidArgument, err)
		}
	}
	// Refuse now a reference the image server could not use later.
	if _, err := pinRef(layer.Ref, layer.Manifest); err != nil {
		return nil, fmt.Errorf("snapshotter: %w: %w", errdefs.ErrInvalidArgument, err)
	}
	return layer, nil
}

// createSnapshot creates an active or view snapshot, as containerd's
// overlay snapshotter does, and brings up the image device it reads
// through, if any.
func (s *Snapshotter) createSnapshot(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) (_ []mount.Mount, err error) {
	var (
		snap storage.Snapshot
		info snapshots.Info
		rec  record
		td   string
	)
	defer func() {
		if td != "" {
			os.RemoveAll(td)
		}
	}()
	if err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		if td, err = s.newSnapshotDir(kind); err != nil {
			return err
		}
		if snap, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...); err != nil {
			return fmt.Errorf("snapshotter: create snapshot: %w", err)
		}
		if _, info, _, err = storage.GetInfo(ctx, key); err != nil {
			return fmt.Errorf("snapshotter: get snapshot info: %w", err)
		}
		if rec.Image, err = s.imageOf(snap.ParentIDs); err != nil {
			return err
		}
		if rec.Image != "" {
			if err := writeRecord(td, rec); err != nil {
				return err
			}
		}
		if err := s.chownUpper(td, snap, info, rec.Image != ""); err != nil {
			return err
		}
		if err := os.Rename(td, s.snapshotDir(snap.ID)); err != nil {
			return fmt.Errorf("snapshotter: %w", err)
		}
		td = ""
		return nil
	}); err != nil {
		return nil, err
	}
	trace, _ := s.traceRequest(key, info.Labels, rec.Image != "")
	if rec.Image != "" {
		recording, err := s.ensureImage(ctx, rec.Image, key, trace)
		if err != nil {
			// Undo the snapshot: a container must not get mounts that do
			// not work.
			if rerr := s.Remove(ctx, key); rerr != nil {
				s.log.Error().Err(rerr).Str("key", key).Msg("remove snapshot after its image failed to mount")
			}
			return nil, err
		}
		if recording {
			// Remembered so that the recording stops with this snapshot;
			// only one this request started, since recordings are known
			// by path and another snapshot's must not end with this one.
			rec.Recording = trace
			if err := writeRecord(s.snapshotDir(snap.ID), rec); err != nil {
				s.log.Warn().Err(err).Str("key", key).Msg("remember a recording: it ends with the device or its max duration instead")
			}
		}
	}
	return s.mounts(snap, info)
}

// imageOf returns the ID of the overlaybd layer nearest the top of a parent
// chain (top first), or "" when the chain has none.
func (s *Snapshotter) imageOf(parentIDs []string) (string, error) {
	for _, id := range parentIDs {
		rec, err := readRecord(s.snapshotDir(id))
		if err != nil {
			return "", err
		}
		if rec.Layer != nil {
			return id, nil
		}
	}
	return "", nil
}

// traceRequest reads a container snapshot's record/replay labels, with
// upstream's meaning: record-trace=yes and record-trace-path=FILE, where an
// empty FILE asks for a recording and a non-empty one (a trace or a path
// list) is replayed. It returns FILE and what it asks for, or TraceOff
// when there is nothing usable to do: a bad request is logged with its
// cause and counted, and never fails the container's start.
func (s *Snapshotter) traceRequest(key string, labels map[string]string, onImage bool) (string, backstore.TraceMode) {
	if labels[LabelRecordTrace] != "yes" {
		return "", backstore.TraceOff
	}
	path := labels[LabelRecordTracePath]
	reason, problem := reasonBadPath, error(nil)
	switch {
	case path == "":
		problem = fmt.Errorf("%s=yes without %s", LabelRecordTrace, LabelRecordTracePath)
	case !filepath.IsAbs(path):
		problem = fmt.Errorf("trace path %q is not absolute", path)
	case !onImage:
		reason, problem = reasonNotOverlaybd, errors.New("the image has no overlaybd layers")
	default:
		st, err := os.Stat(path)
		switch {
		case err != nil:
			problem = fmt.Errorf("trace path: %w", err)
		case !st.Mode().IsRegular():
			problem = fmt.Errorf("trace path %s is not a regular file", path)
		default:
			mode, err := backstore.CheckTraceFile(path)
			if err == nil && mode != backstore.TraceOff {
				return path, mode
			}
			reason, problem = reasonBadTrace, err
			if err == nil {
				problem = fmt.Errorf("trace path %s: nothing to record or replay", path)
			}
		}
	}
	s.traceLabelProblem(key, path, reason, problem)
	return "", backstore.TraceOff
}

func (s *Snapshotter) traceLabelProblem(key, path, reason string, problem error) {
	s.metrics.traceLabelProblems.WithLabelValues(reason).Inc()
	s.log.Warn().Err(problem).Str("key", key).Str("trace", path).Str("reason", reason).
		Msg("trace labels not acted on; the container starts without them")
}

// newSnapshotDir makes a temporary snapshot directory, renamed to its ID
// once the snapshot exists.
func (s *Snapshotter) newSnapshotDir(kind snapshots.Kind) (string, error) {
	td, err := os.MkdirTemp(filepath.Join(s.root, "snapshots"), "new-")
	if err != nil {
		return "", fmt.Errorf("snapshotter: create snapshot directory: %w", err)
	}
	if err := os.Mkdir(filepath.Join(td, "fs"), 0o755); err != nil {
		return td, err
	}
	if kind == snapshots.KindActive {
		if err := os.Mkdir(filepath.Join(td, "work"), 0o711); err != nil {
			return td, err
		}
	}
	return td, nil
}

// chownUpper gives the new upper directory the owner of the layer below
// (or of the ID-mapped root), as containerd's overlay snapshotter does, so
// a user-namespaced container owns its root. Above an image device the
// layer below is the image's root, owned by root: nothing to change.
func (s *Snapshotter) chownUpper(td string, snap storage.Snapshot, info snapshots.Info, onImage bool) error {
	uid, gid := -1, -1
	if _, ok := info.Labels[snapshots.LabelSnapshotUIDMapping]; ok {
		return fmt.Errorf("snapshotter: ID-mapped snapshots are not supported: %w", errdefs.ErrNotImplemented)
	}
	if len(snap.ParentIDs) > 0 && !onImage {
		st, err := os.Stat(s.upperPath(snap.ParentIDs[0]))
		if err != nil {
			return fmt.Errorf("snapshotter: stat parent: %w", err)
		}
		if sys, ok := st.Sys().(*syscall.Stat_t); ok {
			uid, gid = int(sys.Uid), int(sys.Gid)
		}
	}
	if uid == -1 {
		return nil
	}
	return os.Lchown(filepath.Join(td, "fs"), uid, gid)
}

// mounts returns the mounts of an active or view snapshot: its parents'
// upper directories down to the first overlaybd layer, whose place in the
// stack the image's mounted filesystem takes.
func (s *Snapshotter) mounts(snap storage.Snapshot, info snapshots.Info) ([]mount.Mount, error) {
	var lowers []string
	for _, id := range snap.ParentIDs {
		rec, err := readRecord(s.snapshotDir(id))
		if err != nil {
			return nil, err
		}
		if rec.Layer != nil {
			lowers = append(lowers, s.imageMountpoint(id))
			break
		}
		lowers = append(lowers, s.upperPath(id))
	}
	if len(lowers) == 0 {
		mode := "rw"
		if snap.Kind == snapshots.KindView {
			mode = "ro"
		}
		return []mount.Mount{{Source: s.upperPath(snap.ID), Type: "bind", Options: []string{mode, "rbind"}}}, nil
	}
	var options []string
	if snap.Kind == snapshots.KindActive {
		options = append(options, "workdir="+s.workPath(snap.ID), "upperdir="+s.upperPath(snap.ID))
	} else if len(lowers) == 1 {
		return []mount.Mount{{Source: lowers[0], Type: "bind", Options: []string{"ro", "rbind"}}}, nil
	}
	options = append(options, "lowerdir="+strings.Join(lowers, ":"))
	options = append(options, s.overlayOpts...)
	return []mount.Mount{{Type: "overlay", Source: "overlay", Options: options}}, nil
}
