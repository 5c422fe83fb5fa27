package lsmt

import (
	"encoding/binary"
	"fmt"
)

const (
	// SectorSize is the unit of every offset and length in an LSMT index.
	SectorSize = 512
	// MaxSegmentLength is the largest length, in sectors, one index entry holds.
	MaxSegmentLength = 1<<14 - 1
	// MaxOffset is the largest logical sector an entry may start at; it is
	// also the offset of padding entries.
	MaxOffset = 1<<50 - 1
	// MaxMOffset is the largest sector an entry may map to.
	MaxMOffset = 1<<55 - 1
	// EntrySize is the on-disk size of one index entry.
	EntrySize = 16

	// readOnlyIndexLimit is upstream's cap on a committed layer's index
	// entries (MAX_LSMT_RO_INDEX_SIZE).
	readOnlyIndexLimit = 1_000_000
	// writableIndexLimit is upstream's cap on a writable layer's index
	// entries (MAX_LSMT_INDEX_SIZE).
	writableIndexLimit = 128_000_000
)

// Segment is one index entry: sectors [Offset, Offset+Length) of the virtual
// disk are stored at sectors [MOffset, MOffset+Length) of a layer's byte
// space, or read as zeros when Zeroed is set.
type Segment struct {
	Offset  uint64 // logical sector
	MOffset uint64 // sector in the layer's byte space; meaningless when Zeroed
	Length  uint32 // sectors, at most MaxSegmentLength
	Zeroed  bool
	// Tag is the layer a merged segment belongs to (0 = bottom). It is always
	// 0 on disk.
	Tag uint8
}

// End is the first logical sector after the segment.
func (s Segment) End() uint64 { return s.Offset + uint64(s.Length) }

// MEnd is the first mapped sector after the segment. A zeroed segment maps
// nothing, so its MEnd is its MOffset, as upstream computes it.
func (s Segment) MEnd() uint64 {
	if s.Zeroed {
		return s.MOffset
	}
	return s.MOffset + uint64(s.Length)
}

// trimFront drops the segment's first n sectors, moving MOffset along with
// the data unless the segment is zeroed (upstream's forward_offset_to).
func (s *Segment) trimFront(n uint64) {
	s.Offset += n
	s.Length -= uint32(n)
	if !s.Zeroed {
		s.MOffset += n
	}
}

func (s Segment) isPadding() bool { return s.Offset == MaxOffset && s.Length == 0 }

func (s Segment) String() string {
	z := ""
	if s.Zeroed {
		z = " zeroed"
	}
	return fmt.Sprintf("[%d+%d -> %d tag %d%s]", s.Offset, s.Length, s.MOffset, s.Tag, z)
}

// paddingSegment is what upstream writes to fill the index to a multiple of
// 256 entries.
var paddingSegment = Segment{Offset: MaxOffset}

// decodeSegment reads one 16-byte entry. The on-disk tag is ignored: upstream
// resets it to 0 on load.
func decodeSegment(b []byte) Segment {
	w0 := binary.LittleEndian.Uint64(b)
	w1 := binary.LittleEndian.Uint64(b[8:])
	return Segment{
		Offset:  w0 & MaxOffset,
		Length:  uint32(w0 >> 50),
		MOffset: w1 & MaxMOffset,
		Zeroed:  w1>>55&1 == 1,
	}
}

// appendSegment appends the 16-byte on-disk form of s (tag written as 0).
func appendSegment(b []byte, s Segment) []byte {
	w0 := s.Offset&MaxOffset | uint64(s.Length)<<50
	w1 := s.MOffset & MaxMOffset
	if s.Zeroed {
		w1 |= 1 << 55
	}
	b = binary.LittleEndian.AppendUint64(b, w0)
	return binary.LittleEndian.AppendUint64(b, w1)
}

// compactSegments merges neighbours that are contiguous in both offset and
// moffset, share the zeroed flag and tag, and whose summed length stays below
// MaxSegmentLength, in place, exactly as upstream's compress_raw_index does.
// Byte-identical indexes depend on reproducing its greedy rule.
func compactSegments(s []Segment) []Segment {
	if len(s) < 2 {
		return s
	}
	i := 0
	for j := 1; j < len(s); j++ {
		a, b := &s[i], s[j]
		if a.End() == b.Offset && a.MEnd() == b.MOffset && a.Zeroed == b.Zeroed &&
			a.Tag == b.Tag && uint64(a.Length)+uint64(b.Length) < MaxSegmentLength {
			a.Length += b.Length
			continue
		}
		i++
		s[i] = b
	}
	return s[:i+1]
}

// validateIndex checks what upstream checks when it loads an index: entries
// strictly ordered and non-overlapping, and each mapped range inside
// [begin, end) (zeroed ones: begin <= moffset <= end).
func validateIndex(index []Segment, begin, end uint64) error {
	for i, s := range index {
		if s.Length == 0 {
			return fmt.Errorf("%w: entry %d %v has zero length", ErrCorruptIndex, i, s)
		}
		if i > 0 && index[i-1].End() > s.Offset {
			return fmt.Errorf("%w: entry %d %v overlaps or precedes entry %d %v",
				ErrCorruptIndex, i, s, i-1, index[i-1])
		}
		if s.Zeroed {
			if s.MOffset < begin || s.MOffset > end {
				return fmt.Errorf("%w: zeroed entry %d %v maps outside sectors [%d, %d]",
					ErrCorruptIndex, i, s, begin, end)
			}
			continue
		}
		if s.MOffset < begin || s.MEnd() > end {
			return fmt.Errorf("%w: entry %d %v maps outside the data area, sectors [%d, %d)",
				ErrCorruptIndex, i, s, begin, end)
		}
	}
	return nil
}
