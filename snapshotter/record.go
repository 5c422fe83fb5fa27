package snapshotter

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"

	"github.com/opencontainers/go-digest"

	"github.com/obdtrace/obdtrace/internal/atomicfile"
	"github.com/obdtrace/obdtrace/internal/iox"
	"github.com/obdtrace/obdtrace/snapshotter/backstore"
)

// Labels the snapshotter reads. The overlaybd ones are the layer
// annotations, which containerd's unpacker passes as snapshot labels.
const (
	LabelSnapshotRef       = "containerd.io/snapshot.ref"
	LabelImageRef          = "containerd.io/snapshot/image-ref"
	LabelCRIImageRef       = "containerd.io/snapshot/cri.image-ref"
	LabelCRIManifestDigest = "containerd.io/snapshot/cri.manifest-digest"
	LabelBlobDigest        = backstore.AnnotationBlobDigest
	LabelAccelerationLayer = backstore.AnnotationAccelerationLayer
	// LabelDownloadRemoteBlob ("download") asks for the whole image to be
	// fetched in the background once its device attaches.
	LabelDownloadRemoteBlob = backstore.AnnotationPrefix + "download-remote-blob"
	// LabelRemote marks a committed remote snapshot, as upstream does.
	LabelRemote    = "containerd.io/snapshot/remote"
	labelRemoteVal = "remote snapshot"
	// LabelRecordTrace and LabelRecordTracePath are upstream's record and
	// replay triggers on a container's snapshot.
	LabelRecordTrace     = backstore.AnnotationPrefix + "record-trace"
	LabelRecordTracePath = backstore.AnnotationPrefix + "record-trace-path"
)

// recordFile is the snapshotter's own per-snapshot record, beside fs/. It
// is kept out of the labels, which containerd's Update may replace.
const recordFile = "obd.json"

// maxRecordSize bounds a record read back; real ones are well under 1 KiB
// per layer.
const maxRecordSize = 1 << 20

// errBadRecord is wrapped when a record on disk cannot be read.
var errBadRecord = errors.New("snapshotter: bad snapshot record")

// record is what the snapshotter remembers about one snapshot.
type record struct {
	// Layer is set on a committed overlaybd layer (or trace layer).
	Layer *layerRecord `json:"layer,omitempty"`
	// Image, on an active or view snapshot, is the ID of the overlaybd
	// layer whose device its mounts read: the top of its overlaybd chain.
	Image string `json:"image,omitempty"`
	// Recording, on a container's snapshot, is the trace file its labels
	// asked to record into: the recording stops when the snapshot goes.
	Recording string `json:"recording,omitempty"`
}

// layerRecord describes a remote overlaybd layer.
type layerRecord struct {
	Blob digest.Digest `json:"blob"`
	// Trace marks the image's trace (acceleration) layer.
	Trace bool `json:"trace,omitempty"`
	// Ref is the image reference the layer was pulled by; Manifest, when
	// the pull passed it, pins the image manifest.
	Ref      string        `json:"ref"`
	Manifest digest.Digest `json:"manifest,omitempty"`
	// Chain is the blob digests of this layer and those beneath it,
	// bottom first: what the image served for it must consist of.
	Chain     []digest.Digest `json:"chain"`
	FullFetch bool            `json:"full_fetch,omitempty"`
}

func (s *Snapshotter) snapshotDir(id string) string {
	return filepath.Join(s.root, "snapshots", id)
}

func (s *Snapshotter) upperPath(id string) string { return filepath.Join(s.snapshotDir(id), "fs") }

func (s *Snapshotter) workPath(id string) string { return filepath.Join(s.snapshotDir(id), "work") }

// blockDir holds an overlaybd top layer's device mount, server spec and log.
func (s *Snapshotter) blockDir(id string) string { return filepath.Join(s.snapshotDir(id), "block") }

func (s *Snapshotter) imageMountpoint(id string) string {
	return filepath.Join(s.blockDir(id), "mnt")
}

// readRecord reads the record in a snapshot directory; a snapshot without
// one (an ordinary layer) has the zero record.
func readRecord(dir string) (record, error) {
	b, err := iox.ReadFileLimit(filepath.Join(dir, recordFile), maxRecordSize)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return record{}, nil
	case errors.Is(err, iox.ErrTooLarge):
		return record{}, fmt.Errorf("%w: %w", errBadRecord, err)
	case err != nil:
		return record{}, err
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil {
		return record{}, fmt.Errorf("%w: %s: %w", errBadRecord, dir, err)
	}
	return r, nil
}

func writeRecord(dir string, r record) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(dir, recordFile), b, 0o600)
}
