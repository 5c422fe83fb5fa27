package backstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/internal/iox"
	"github.com/obdtrace/obdtrace/recorder"
	"github.com/obdtrace/obdtrace/replayer"
	"github.com/obdtrace/obdtrace/trace"
)

// ErrBadTrace is wrapped when a trace file given to replay holds no trace
// or path list this package can replay.
var ErrBadTrace = errors.New("backstore: bad trace file")

// Bounds on the walk of a path list's directories.
const (
	// maxPathListFiles bounds the files a path list expands to.
	maxPathListFiles = 1 << 16
	// maxDirEntries bounds the names read of one directory (about 50 MiB
	// of names at most): all of them are read and sorted before any is
	// taken, so that the files kept under maxPathListFiles do not depend
	// on the order the kernel lists them in. A larger directory is skipped.
	maxDirEntries = 1 << 20
	// maxWalkDepth bounds the directory depth a listed directory is walked.
	maxWalkDepth = 64
	// maxRequestSectors splits a file extent into mapper requests.
	maxRequestSectors = 8 << 20 / 512
)

// CheckTraceFile applies upstream's trace-path rules to path and, when the
// file is to be replayed, checks that it holds a trace (binary or
// protobuf) or a path list, so that a bad file is reported before anything
// is started with it.
func CheckTraceFile(path string) (TraceMode, error) {
	mode, err := TraceModeOf(path)
	if err != nil || mode != TraceReplay {
		return mode, err
	}
	b, err := readTraceFile(path)
	if err != nil {
		return TraceOff, err
	}
	if trace.Detect(b) == trace.KindPathList {
		_, err = trace.ParsePathList(b)
	} else {
		_, err = replayer.Load(b)
	}
	if err != nil {
		return TraceOff, fmt.Errorf("%w: %s: %w", ErrBadTrace, path, err)
	}
	return TraceReplay, nil
}

// readTraceFile reads a trace file of at most maxTraceFile bytes.
func readTraceFile(path string) ([]byte, error) {
	b, err := iox.ReadFileLimit(path, maxTraceFile)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadTrace, err)
	}
	return b, nil
}

// loadReplayTrace loads what a mount replays: cfg.TraceFile (a trace, or a
// path list resolved in the filesystem mounted at cfg.Mountpoint), else
// the image's trace layer.
func loadReplayTrace(ctx context.Context, cfg Config, img *Image) (*trace.Trace, error) {
	if cfg.TraceFile == "" {
		return loadTraceLayer(ctx, img)
	}
	b, err := readTraceFile(cfg.TraceFile)
	if err != nil {
		return nil, err
	}
	if trace.Detect(b) != trace.KindPathList {
		return replayer.Load(b)
	}
	paths, err := trace.ParsePathList(b)
	if err != nil {
		return nil, err
	}
	if cfg.mounted != nil {
		select {
		case <-cfg.mounted:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	t, st, err := PathListTrace(ctx, cfg.Mountpoint, paths, img)
	if err != nil {
		return nil, err
	}
	cfg.Logger.Info().Str("trace", cfg.TraceFile).Int("entries", st.Entries).Int("files", st.Files).
		Int("skipped", st.Skipped).Int64("bytes", st.Bytes).Int("frames", len(t.Frames)).Msg("path list resolved")
	return t, nil
}

// PathListStats say what a path list resolved to.
type PathListStats struct {
	Entries int   // paths in the list
	Files   int   // regular files whose extents were taken
	Skipped int   // entries missing or of the wrong type, files whose extents could not be read, entries past maxPathListFiles
	Bytes   int64 // device bytes of the files' extents
}

// PathListTrace turns upstream's path list into a trace of img, the image
// whose ext4 is mounted at root: each listed file's extents (FIEMAP), in
// list order, mapped through the image's merged index to per-layer frames.
// A path ending in "/" names a directory whose regular files are taken
// recursively (upstream walks it with photon's Walker), in name order.
// Paths resolve inside root: symlinks cannot leave the image's filesystem.
// Entries that do not resolve are skipped and counted, as upstream skips
// them; an error means nothing of the list could be used.
func PathListTrace(ctx context.Context, root string, paths []string, img *Image) (*trace.Trace, PathListStats, error) {
	st := PathListStats{Entries: len(paths)}
	m, err := recorder.NewMapper(img.Stack, recorder.MapperOptions{})
	if err != nil {
		return nil, st, err
	}
	rootFD, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, st, fmt.Errorf("backstore: path list: open %s: %w", root, err)
	}
	defer unix.Close(rootFD)
	w := &pathWalker{ctx: ctx, m: m, st: &st, maxFiles: maxPathListFiles, maxDir: maxDirEntries, extents: fileExtents}
	for i, p := range paths {
		if err := ctx.Err(); err != nil {
			return nil, st, err
		}
		if w.full {
			st.Skipped += len(paths) - i
			break
		}
		rel := strings.TrimPrefix(p, "/")
		if rel == "" || rel == "/" {
			rel = "."
		}
		fd, err := unix.Openat2(rootFD, rel, &unix.OpenHow{
			Flags:   unix.O_RDONLY | unix.O_CLOEXEC | unix.O_NOCTTY | unix.O_NONBLOCK,
			Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV,
		})
		if err != nil {
			st.Skipped++
			continue
		}
		w.entry(fd, strings.HasSuffix(p, "/"))
	}
	if err := ctx.Err(); err != nil {
		return nil, st, err // the walk was cut short: no trace from half a list
	}
	layers := img.traceLayers()
	t, err := m.Trace(layers, trace.Meta{ImageRef: img.Remote.Ref, ManifestDigest: img.Remote.ManifestDescriptor.Digest})
	if err != nil {
		return nil, st, err
	}
	if len(t.Frames) == 0 {
		return nil, st, fmt.Errorf("%w: path list of %d entries: no file with data in the image (%d skipped)",
			ErrBadTrace, st.Entries, st.Skipped)
	}
	return t, st, nil
}

// pathWalker feeds the extents of the files a path list names to a mapper.
type pathWalker struct {
	ctx      context.Context
	m        *recorder.Mapper
	st       *PathListStats
	maxFiles int  // maxPathListFiles (smaller in tests)
	maxDir   int  // maxDirEntries (smaller in tests)
	full     bool // maxFiles reached
	// extents is fileExtents (a stand-in in tests).
	extents func(ctx context.Context, fd int, size int64, fn func(phys, n int64)) error
}

// entry takes fd (which it closes): a regular file, or with dir a
// directory to walk.
func (w *pathWalker) entry(fd int, dir bool) {
	defer unix.Close(fd)
	var s unix.Stat_t
	if err := unix.Fstat(fd, &s); err != nil {
		w.st.Skipped++
		return
	}
	switch mode := s.Mode & unix.S_IFMT; {
	case dir && mode == unix.S_IFDIR:
		w.walk(fd, 0)
	case !dir && mode == unix.S_IFREG:
		w.file(fd, s.Size)
	default:
		w.st.Skipped++
	}
}

// walk takes the regular files below the directory fd, depth first in
// name order, without following symlinks. Once maxPathListFiles is
// reached, the names not visited are counted as skipped.
func (w *pathWalker) walk(fd, depth int) {
	if w.full || w.ctx.Err() != nil {
		return
	}
	if depth > maxWalkDepth {
		w.st.Skipped++
		return
	}
	names, err := readDirNames(fd, w.maxDir)
	if err != nil {
		w.st.Skipped++
	}
	for i, name := range names {
		if w.ctx.Err() != nil {
			return
		}
		if w.full {
			w.st.Skipped += len(names) - i
			return
		}
		child, err := unix.Openat2(fd, name, &unix.OpenHow{
			Flags:   unix.O_RDONLY | unix.O_CLOEXEC | unix.O_NOCTTY | unix.O_NONBLOCK | unix.O_NOFOLLOW,
			Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_XDEV,
		})
		if err != nil {
			continue // a symlink, or gone: not a file to take
		}
		var s unix.Stat_t
		if unix.Fstat(child, &s) == nil {
			switch s.Mode & unix.S_IFMT {
			case unix.S_IFDIR:
				w.walk(child, depth+1)
			case unix.S_IFREG:
				w.file(child, s.Size)
			}
		}
		unix.Close(child)
	}
}

// readDirNames lists all of a directory's entries, sorted; a directory of
// more than limit gives errDirTooLarge and no names. The fd stays open.
func readDirNames(fd, limit int) ([]string, error) {
	dup, err := unix.Dup(fd)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(dup), "dir")
	defer f.Close()
	// The dup shares fd's offset: start from the first entry whatever
	// read fd before.
	if _, err := unix.Seek(dup, 0, io.SeekStart); err != nil {
		return nil, err
	}
	var names []string
	for {
		chunk, err := f.Readdirnames(4096)
		names = append(names, chunk...)
		if len(names) > limit {
			return nil, fmt.Errorf("%w: over %d entries", errDirTooLarge, limit)
		}
		if errors.Is(err, io.EOF) || (err == nil && len(chunk) == 0) {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	slices.Sort(names)
	return names, nil
}

// errDirTooLarge is returned for a directory a path list walk skips for its
// size.
var errDirTooLarge = errors.New("backstore: path list: directory too large")

// file adds the extents of the regular file fd of size bytes.
func (w *pathWalker) file(fd int, size int64) {
	if w.st.Files >= w.maxFiles {
		w.full = true
		w.st.Skipped++
		return
	}
	w.st.Files++
	err := w.extents(w.ctx, fd, size, func(phys, n int64) {
		w.st.Bytes += n
		first, end := phys/512, (phys+n+511)/512
		for s := first; s < end; s += maxRequestSectors {
			w.m.Add(recorder.Request{Sector: uint64(s), Sectors: uint32(min(end-s, maxRequestSectors))})
		}
	})
	if err != nil {
		w.st.Skipped++
	}
}

// traceLayers lists the image's layers for a trace, bottom first.
func (img *Image) traceLayers() []trace.Layer {
	layers := make([]trace.Layer, len(img.Layers))
	for i, l := range img.Layers {
		layers[i] = trace.Layer{Digest: l.Digest, Size: l.Size}
	}
	return layers
}
