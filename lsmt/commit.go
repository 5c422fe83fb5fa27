package lsmt

import (
	"bufio"
	"fmt"
	"io"
)

// CommitArgs are the identity fields a committed layer carries.
type CommitArgs struct {
	VirtualSize int64
	UUID        string // 36 characters; converted layers use the chain id
	ParentUUID  string
	UserTag     string // commit message, at most 256 bytes
}

// commitCopyStep is upstream's copy buffer: committed data is emitted in
// pieces of at most this size, and the index compaction that follows depends
// on those piece boundaries.
const commitCopyStep = 32 << 10

// indexPadMultiple is the number of entries the committed index is padded to
// a multiple of (one 4 KiB block of entries).
const indexPadMultiple = HeaderSize / EntrySize

// Commit writes a committed layer to w: header, the data of index's segments
// read from src (the byte space their MOffsets point into), the compacted
// and padded index, and the trailer. It reproduces upstream's commit (the
// compact() routine) so that committing a committed layer's own index and data
// gives the same index and data area. index must be sorted and
// non-overlapping. w is written sequentially, so it may be a compressor.
func Commit(w io.Writer, src io.ReaderAt, index []Segment, args CommitArgs) error {
	if err := validateIndex(index, 0, MaxMOffset); err != nil {
		return fmt.Errorf("lsmt: commit: %w", err)
	}
	h := Header{
		Flags:       FlagHeader | FlagData | FlagSealed,
		VirtualSize: uint64(args.VirtualSize),
		UUID:        args.UUID,
		ParentUUID:  args.ParentUUID,
		Version:     1,
		SubVersion:  1,
		UserTag:     args.UserTag,
	}
	slot, err := h.marshal()
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(w, 1<<20)
	if _, err := bw.Write(slot); err != nil {
		return fmt.Errorf("lsmt: commit: write header: %w", err)
	}
	out, moffset, err := commitData(bw, src, index)
	if err != nil {
		return err
	}
	out = compactSegments(out)
	raw := make([]byte, 0, (len(out)+indexPadMultiple)*EntrySize)
	for _, s := range out {
		raw = appendSegment(raw, s)
	}
	for n := len(out); n%indexPadMultiple != 0; n++ {
		raw = appendSegment(raw, paddingSegment)
	}
	if _, err := bw.Write(raw); err != nil {
		return fmt.Errorf("lsmt: commit: write index: %w", err)
	}
	h.Flags = FlagData | FlagSealed
	h.IndexOffset = moffset * SectorSize
	h.IndexSize = uint64(len(raw) / EntrySize)
	if slot, err = h.marshal(); err != nil {
		return err
	}
	if _, err := bw.Write(slot); err != nil {
		return fmt.Errorf("lsmt: commit: write trailer: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("lsmt: commit: %w", err)
	}
	return nil
}

// commitData copies each segment's data to w right after the header and
// returns the new index (one entry per copy step, as upstream's pcopy emits
// them) and the first sector after the data.
func commitData(w io.Writer, src io.ReaderAt, index []Segment) ([]Segment, uint64, error) {
	moffset := uint64(HeaderSize / SectorSize)
	out := make([]Segment, 0, len(index))
	buf := make([]byte, commitCopyStep)
	for _, s := range index {
		if s.Zeroed {
			out = append(out, Segment{Offset: s.Offset, Length: s.Length, MOffset: moffset, Zeroed: true})
			continue
		}
		for done := uint64(0); done < uint64(s.Length); {
			step := min(uint64(s.Length)-done, commitCopyStep/SectorSize)
			p := buf[:step*SectorSize]
			if err := readFull(src, p, int64(s.MOffset+done)*SectorSize); err != nil {
				return nil, 0, fmt.Errorf("lsmt: commit: read segment %v: %w", s, err)
			}
			if _, err := w.Write(p); err != nil {
				return nil, 0, fmt.Errorf("lsmt: commit: write data: %w", err)
			}
			out = append(out, Segment{Offset: s.Offset + done, Length: uint32(step), MOffset: moffset})
			moffset += step
			done += step
		}
	}
	return out, moffset, nil
}
