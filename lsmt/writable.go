package lsmt

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
)

// maxWriteSize is upstream's MAX_IO_SIZE: longer writes are split, so one
// index entry never exceeds MaxSegmentLength.
const maxWriteSize = 4 << 20

// indexFlushEntries is how many index entries are buffered before they are
// appended to the index file (upstream's group commit of one 4 KiB block).
const indexFlushEntries = HeaderSize / EntrySize

// ErrClosed is returned by a Writable used after Close.
var ErrClosed = errors.New("lsmt: writable layer closed")

// Writable is a writable layer in append mode: data is appended to a data
// file and one raw index entry per write to an index file. Reopening replays
// the index file in order, so a later entry overrides earlier ones.
// Methods are safe for concurrent use.
type Writable struct {
	mu      sync.RWMutex
	data    *os.File
	idxFile *os.File
	index   memIndex
	header  Header // of the data file
	dataEnd int64  // next append position in the data file
	pending []byte // index entries not yet appended to idxFile
	// savedVSize is the virtual size in the files' headers; writes past it
	// grow header.VirtualSize, and sync rewrites the headers.
	savedVSize uint64
	closed     bool
}

// WritableOptions describe a new writable layer.
type WritableOptions struct {
	VirtualSize int64
	UUID        string
	ParentUUID  string
}

// CreateWritable creates a writable layer's data and index files (which must
// not exist).
func CreateWritable(dataPath, indexPath string, opts WritableOptions) (*Writable, error) {
	h := Header{
		Flags:       FlagHeader | FlagData,
		VirtualSize: uint64(opts.VirtualSize),
		UUID:        opts.UUID,
		ParentUUID:  opts.ParentUUID,
		Version:     1,
		SubVersion:  1,
	}
	data, err := createWithSlot(dataPath, h)
	if err != nil {
		return nil, err
	}
	ih := h
	ih.Flags = FlagHeader
	ih.IndexOffset = HeaderSize
	idx, err := createWithSlot(indexPath, ih)
	if err != nil {
		data.Close()
		os.Remove(dataPath)
		return nil, err
	}
	return &Writable{data: data, idxFile: idx, index: newMemIndex(), header: h, dataEnd: HeaderSize,
		savedVSize: h.VirtualSize}, nil
}

func createWithSlot(path string, h Header) (*os.File, error) {
	slot, err := h.marshal()
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lsmt: create writable layer: %w", err)
	}
	if _, err := f.WriteAt(slot, 0); err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("lsmt: write header of %s: %w", path, err)
	}
	return f, nil
}

// OpenWritable reopens a writable layer, replaying its index file.
func OpenWritable(dataPath, indexPath string) (w *Writable, err error) {
	data, err := os.OpenFile(dataPath, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("lsmt: open writable layer: %w", err)
	}
	idx, err := os.OpenFile(indexPath, os.O_RDWR, 0)
	if err != nil {
		data.Close()
		return nil, fmt.Errorf("lsmt: open writable layer: %w", err)
	}
	defer func() {
		if err != nil {
			data.Close()
			idx.Close()
		}
	}()
	h, dataEnd, err := checkWritableFiles(data, idx)
	if err != nil {
		return nil, err
	}
	index, err := replayIndex(idx, uint64(dataEnd/SectorSize))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", indexPath, err)
	}
	return &Writable{data: data, idxFile: idx, index: index, header: h, dataEnd: dataEnd,
		savedVSize: h.VirtualSize}, nil
}

func checkWritableFiles(data, idx *os.File) (Header, int64, error) {
	slot := make([]byte, HeaderSize)
	if err := readFull(data, slot, 0); err != nil {
		return Header{}, 0, fmt.Errorf("lsmt: read data file header: %w", err)
	}
	h, err := parseHeader(slot, "data file header")
	if err != nil {
		return Header{}, 0, err
	}
	if !h.IsHeader() || !h.IsData() || h.IsSealed() || h.Flags&FlagSparse != 0 {
		return Header{}, 0, fmt.Errorf("%w: data file flags %#x: want an unsealed append-mode data file",
			ErrNotLSMT, h.Flags)
	}
	if err := readFull(idx, slot, 0); err != nil {
		return Header{}, 0, fmt.Errorf("lsmt: read index file header: %w", err)
	}
	ih, err := parseHeader(slot, "index file header")
	if err != nil {
		return Header{}, 0, err
	}
	if !ih.IsHeader() || ih.IsData() || ih.IsSealed() || ih.IndexOffset != HeaderSize {
		return Header{}, 0, fmt.Errorf("%w: index file flags %#x, index offset %d: want an unsealed index file",
			ErrNotLSMT, ih.Flags, ih.IndexOffset)
	}
	st, err := data.Stat()
	if err != nil {
		return Header{}, 0, fmt.Errorf("lsmt: %w", err)
	}
	if st.Size()%SectorSize != 0 {
		return Header{}, 0, fmt.Errorf("%w: data file size %d is not sector aligned", ErrCorrupt, st.Size())
	}
	return h, st.Size(), nil
}

// replayIndex applies the index file's entries in order; a torn entry at
// the end (a crash mid-append) is ignored.
func replayIndex(idx *os.File, dataEndSector uint64) (memIndex, error) {
	st, err := idx.Stat()
	if err != nil {
		return memIndex{}, fmt.Errorf("lsmt: %w", err)
	}
	n := (st.Size() - HeaderSize) / EntrySize
	if n > writableIndexLimit {
		return memIndex{}, fmt.Errorf("%w: %d entries, more than the limit of %d", ErrCorruptIndex, n, writableIndexLimit)
	}
	index := newMemIndex()
	buf := make([]byte, 4096*EntrySize)
	for i, off := int64(0), int64(HeaderSize); i < n; {
		chunk := buf[:min(int64(len(buf)/EntrySize), n-i)*EntrySize]
		if err := readFull(idx, chunk, off); err != nil {
			return memIndex{}, fmt.Errorf("lsmt: read index entries: %w", err)
		}
		for j := 0; j < len(chunk); j, i = j+EntrySize, i+1 {
			s := decodeSegment(chunk[j:])
			if s.isPadding() || s.Length == 0 {
				continue
			}
			if err := validateIndex([]Segment{s}, HeaderSize/SectorSize, dataEndSector); err != nil {
				return memIndex{}, fmt.Errorf("entry %d: %w", i, err)
			}
			index.insert(s)
		}
		off += int64(len(chunk))
	}
	return index, nil
}

// VirtualSize is the size of the layer's disk in bytes.
func (w *Writable) VirtualSize() int64 {
	w.mu.RLock()
	defer w.mu.RUnlock()
	return int64(w.header.VirtualSize)
}

// WriteAt appends p as the data for [off, off+len(p)). Both must be sector
// aligned.
func (w *Writable) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off%SectorSize != 0 || len(p)%SectorSize != 0 {
		return 0, fmt.Errorf("%w: write of %d bytes at %d", ErrAlignment, len(p), off)
	}
	if uint64(off+int64(len(p)))/SectorSize > MaxOffset {
		return 0, fmt.Errorf("lsmt: write at %d beyond the largest addressable sector", off)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return 0, ErrClosed
	}
	done := 0
	for done < len(p) {
		chunk := p[done:min(len(p), done+maxWriteSize)]
		if _, err := w.data.WriteAt(chunk, w.dataEnd); err != nil {
			return done, fmt.Errorf("lsmt: append data: %w", err)
		}
		s := Segment{
			Offset:  uint64(off+int64(done)) / SectorSize,
			Length:  uint32(len(chunk) / SectorSize),
			MOffset: uint64(w.dataEnd) / SectorSize,
		}
		w.dataEnd += int64(len(chunk))
		if err := w.record(s); err != nil {
			return done, err
		}
		done += len(chunk)
	}
	if end := uint64(off) + uint64(len(p)); end > w.header.VirtualSize {
		w.header.VirtualSize = end
	}
	return done, nil
}

// Discard makes [off, off+n) read as zeros (a punched hole).
func (w *Writable) Discard(off, n int64) error {
	if off < 0 || n < 0 || off%SectorSize != 0 || n%SectorSize != 0 {
		return fmt.Errorf("%w: discard of %d bytes at %d", ErrAlignment, n, off)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return ErrClosed
	}
	for sector, end := uint64(off/SectorSize), uint64((off+n)/SectorSize); sector < end; {
		length := min(end-sector, MaxSegmentLength)
		s := Segment{Offset: sector, Length: uint32(length), MOffset: uint64(w.dataEnd) / SectorSize, Zeroed: true}
		if err := w.record(s); err != nil {
			return err
		}
		sector += length
	}
	return nil
}

// record inserts s into the memory index and queues its on-disk entry.
func (w *Writable) record(s Segment) error {
	w.index.insert(s)
	w.pending = appendSegment(w.pending, s)
	if len(w.pending) >= indexFlushEntries*EntrySize {
		return w.flushIndex()
	}
	return nil
}

func (w *Writable) flushIndex() error {
	if len(w.pending) == 0 {
		return nil
	}
	if _, err := w.idxFile.Seek(0, io.SeekEnd); err != nil {
		return fmt.Errorf("lsmt: append index: %w", err)
	}
	if _, err := w.idxFile.Write(w.pending); err != nil {
		return fmt.Errorf("lsmt: append index: %w", err)
	}
	w.pending = w.pending[:0]
	return nil
}

// ReadAt reads the layer's disk: unwritten ranges and discarded ones read as
// zeros.
func (w *Writable) ReadAt(p []byte, off int64) (int, error) {
	w.mu.RLock()
	defer w.mu.RUnlock()
	if w.closed {
		return 0, ErrClosed
	}
	segs := w.segmentsIn(uint64(max(off, 0))/SectorSize, uint64(off+int64(len(p))+SectorSize-1)/SectorSize)
	x := newSegmentIndex(segs)
	return readMapped(p, off, int64(w.header.VirtualSize), &x, func(uint8) io.ReaderAt { return w.data })
}

// segmentsIn returns the segments overlapping sectors [from, to).
func (w *Writable) segmentsIn(from, to uint64) []Segment {
	var out []Segment
	w.index.ascendFrom(from, func(s Segment) bool {
		if s.Offset >= to {
			return false
		}
		out = append(out, s)
		return true
	})
	return out
}

// Index returns a snapshot of the layer's current index.
func (w *Writable) Index() []Segment {
	w.mu.RLock()
	defer w.mu.RUnlock()
	return w.index.segments()
}

// Sync makes every write so far durable: buffered index entries are
// appended and both files are fsynced.
func (w *Writable) Sync() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return ErrClosed
	}
	return w.sync()
}

func (w *Writable) sync() error {
	if err := w.flushIndex(); err != nil {
		return err
	}
	if w.header.VirtualSize != w.savedVSize {
		if err := w.saveVirtualSize(); err != nil {
			return err
		}
	}
	if err := w.data.Sync(); err != nil {
		return fmt.Errorf("lsmt: sync data file: %w", err)
	}
	if err := w.idxFile.Sync(); err != nil {
		return fmt.Errorf("lsmt: sync index file: %w", err)
	}
	return nil
}

// saveVirtualSize rewrites both files' headers with the grown virtual size,
// as upstream's update_vsize does.
func (w *Writable) saveVirtualSize() error {
	for _, f := range []*os.File{w.data, w.idxFile} {
		slot := make([]byte, HeaderSize)
		if err := readFull(f, slot, 0); err != nil {
			return fmt.Errorf("lsmt: update virtual size: %w", err)
		}
		h, err := parseHeader(slot, f.Name())
		if err != nil {
			return fmt.Errorf("lsmt: update virtual size: %w", err)
		}
		h.VirtualSize = w.header.VirtualSize
		if slot, err = h.marshal(); err != nil {
			return err
		}
		if _, err := f.WriteAt(slot, 0); err != nil {
			return fmt.Errorf("lsmt: update virtual size: %w", err)
		}
	}
	w.savedVSize = w.header.VirtualSize
	return nil
}

// Commit writes the layer's content as a committed layer to out.
func (w *Writable) Commit(out io.Writer, args CommitArgs) error {
	w.mu.RLock()
	defer w.mu.RUnlock()
	if w.closed {
		return ErrClosed
	}
	if args.VirtualSize == 0 {
		args.VirtualSize = int64(w.header.VirtualSize)
	}
	return Commit(out, w.data, w.index.segments(), args)
}

// Close syncs and closes the layer's files.
func (w *Writable) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil
	}
	w.closed = true
	err := w.sync()
	if e := w.data.Close(); err == nil {
		err = e
	}
	if e := w.idxFile.Close(); err == nil {
		err = e
	}
	return err
}
