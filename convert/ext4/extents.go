package ext4

import (
	"encoding/binary"
	"fmt"
	"io"
	"slices"
)

// Extent is a run of Len filesystem blocks starting at block Start.
type Extent struct {
	Start, Len uint64
}

const (
	inodeFlagExtents = 0x80000
	extentMagic      = 0xF30A
	extentEntrySize  = 12
	// maxExtentDepth is the deepest extent tree the kernel builds.
	maxExtentDepth = 5
	// maxExtents and maxExtentNodes bound what a corrupt tree (say, one
	// whose index entries all point at the same block) can make us do.
	maxExtents     = 1 << 16
	maxExtentNodes = 1 << 10
)

// JournalExtents returns the blocks of the internal journal, sorted and
// merged, or nil when the filesystem has none. The journal inode must map
// its blocks with extents, as mke2fs does for ext4.
func (fs *FS) JournalExtents(r io.ReaderAt) ([]Extent, error) {
	sb := fs.SB
	if !sb.HasJournal() {
		return nil, nil
	}
	if sb.Incompat&incompatJournalDev != 0 || sb.JournalDev != 0 || sb.JournalInum == 0 {
		return nil, fmt.Errorf("%w: external journal device", ErrUnsupported)
	}
	inode, err := fs.ReadInode(r, sb.JournalInum)
	if err != nil {
		return nil, fmt.Errorf("ext4: journal inode: %w", err)
	}
	if binary.LittleEndian.Uint32(inode[0x20:])&inodeFlagExtents == 0 {
		return nil, fmt.Errorf("%w: journal inode %d maps blocks without extents", ErrUnsupported, sb.JournalInum)
	}
	w := extentWalker{fs: fs, r: r}
	if err := w.node(inode[0x28:0x28+60], maxExtentDepth+1); err != nil {
		return nil, fmt.Errorf("ext4: journal inode %d: %w", sb.JournalInum, err)
	}
	return mergeExtents(w.out), nil
}

type extentWalker struct {
	fs    *FS
	r     io.ReaderAt
	out   []Extent
	nodes int
}

// node walks one extent tree node, whose depth must be below limit (a
// child's is below its parent's, so a loop in a corrupt tree ends).
func (w *extentWalker) node(b []byte, limit int) error {
	le := binary.LittleEndian
	if len(b) < extentEntrySize || le.Uint16(b) != extentMagic {
		return fmt.Errorf("%w: bad extent header", ErrCorrupt)
	}
	entries, maxEntries, depth := int(le.Uint16(b[2:])), int(le.Uint16(b[4:])), int(le.Uint16(b[6:]))
	if capacity := len(b)/extentEntrySize - 1; entries > maxEntries || maxEntries > capacity {
		return fmt.Errorf("%w: extent node with %d of %d entries in room for %d", ErrCorrupt, entries, maxEntries, capacity)
	}
	if depth >= limit {
		return fmt.Errorf("%w: extent node of depth %d below one of depth %d or over %d", ErrCorrupt, depth, limit, maxExtentDepth)
	}
	for i := 1; i <= entries; i++ {
		e := b[i*extentEntrySize:]
		if depth == 0 {
			n := uint64(le.Uint16(e[4:]))
			if n > 32768 { // an unwritten extent
				n -= 32768
			}
			start := uint64(le.Uint16(e[6:]))<<32 | uint64(le.Uint32(e[8:]))
			if start+n > w.fs.SB.BlocksCount || start+n < start {
				return fmt.Errorf("%w: extent [%d, +%d) outside the %d blocks", ErrCorrupt, start, n, w.fs.SB.BlocksCount)
			}
			if len(w.out) >= maxExtents {
				return fmt.Errorf("%w: more than %d extents", ErrUnsupported, maxExtents)
			}
			w.out = append(w.out, Extent{Start: start, Len: n})
			continue
		}
		leaf := uint64(le.Uint16(e[8:]))<<32 | uint64(le.Uint32(e[4:]))
		if leaf >= w.fs.SB.BlocksCount {
			return fmt.Errorf("%w: extent index points at block %d of %d", ErrCorrupt, leaf, w.fs.SB.BlocksCount)
		}
		if w.nodes++; w.nodes > maxExtentNodes {
			return fmt.Errorf("%w: more than %d extent tree blocks", ErrUnsupported, maxExtentNodes)
		}
		child := make([]byte, w.fs.SB.BlockSize)
		if err := readFull(w.r, child, int64(leaf)*w.fs.SB.BlockSize); err != nil {
			return fmt.Errorf("ext4: read extent block %d: %w", leaf, err)
		}
		if err := w.node(child, depth); err != nil {
			return err
		}
	}
	return nil
}

// mergeExtents sorts extents and merges overlapping or adjacent ones.
func mergeExtents(in []Extent) []Extent {
	slices.SortFunc(in, func(a, b Extent) int {
		switch {
		case a.Start < b.Start:
			return -1
		case a.Start > b.Start:
			return 1
		}
		return 0
	})
	out := in[:0]
	for _, e := range in {
		if e.Len == 0 {
			continue
		}
		if n := len(out); n > 0 && e.Start <= out[n-1].Start+out[n-1].Len {
			out[n-1].Len = max(out[n-1].Len, e.Start+e.Len-out[n-1].Start)
			continue
		}
		out = append(out, e)
	}
	return out
}
