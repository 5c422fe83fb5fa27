package ext4

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"slices"
)

// ReadWriterAt is a disk that can be patched in place.
type ReadWriterAt interface {
	io.ReaderAt
	io.WriterAt
}

// Superblock state bits and the fields a mount updates.
const (
	stateErrors = 0x2
)

// mountFields are the superblock byte ranges a mount and the writes under
// it change from the clock or by counting: s_mtime, s_wtime, s_mnt_count;
// s_lastcheck; s_last_mounted (the mount point's path); s_kbytes_written;
// and the high bytes of s_wtime, s_mtime and s_lastcheck.
var mountFields = [][2]int{
	{0x2C, 0x36}, {0x40, 0x44}, {0x88, 0xC8}, {0x178, 0x180}, {0x274, 0x276}, {0x277, 0x278},
}

// RestoreMountFields puts back into the superblock on rw the mount
// bookkeeping it had in before (read before mounting), so that the mount
// leaves no trace there but the changes the writes made. It fails when the
// kernel recorded filesystem errors or the filesystem was not cleanly
// unmounted.
func RestoreMountFields(rw ReadWriterAt, before *Superblock) error {
	cur, err := ReadSuperblock(rw)
	if err != nil {
		return err
	}
	if cur.State&stateErrors != 0 || cur.ErrorCount != 0 {
		return fmt.Errorf("%w: the kernel recorded %d filesystem errors (state %#x)", ErrCorrupt, cur.ErrorCount, cur.State)
	}
	if cur.Incompat&incompatRecover != 0 {
		return fmt.Errorf("%w: the journal needs recovery: not cleanly unmounted", ErrCorrupt)
	}
	raw := cur.raw
	for _, f := range mountFields {
		copy(raw[f[0]:f[1]], before.raw[f[0]:f[1]])
	}
	if raw == cur.raw {
		return nil
	}
	if _, err := rw.WriteAt(raw[:], SuperblockOffset); err != nil {
		return fmt.Errorf("ext4: write superblock: %w", err)
	}
	return nil
}

// NormalizeStats counts what NormalizeInodes did.
type NormalizeStats struct {
	Blocks  int // inode table blocks examined
	InUse   int // inodes in use, normalised
	Cleared int // unused inodes that held stale bytes, zeroed
	Written int // blocks rewritten
}

// Inode field offsets (struct ext4_inode).
const (
	iCtime      = 0x0C
	iMtime      = 0x10
	iVersionLo  = 0x24 // osd1: l_i_version on Linux
	iGeneration = 0x64
	iExtraIsize = 0x80
	iCtimeExtra = 0x84
	iMtimeExtra = 0x88
	iCrtime     = 0x90
	iCrtimeXtra = 0x94
	iVersionHi  = 0x98
	goodOldSize = 128
)

// NormalizeInodes normalises every inode of the inode table blocks that lie
// in touched (extents of filesystem blocks, typically those a layer wrote):
//
//   - an inode in use gets its change and creation times set to its
//     modification time, and its generation number and i_version counter
//     set to zero (the kernel draws the first at random and counts the
//     second);
//   - an unused inode is zeroed: a deleted one keeps its deletion time and
//     stale fields otherwise, and the kernel rewrites an inode in full when
//     it allocates one.
//
// Whether an inode is in use is read from the group's inode bitmap.
func (fs *FS) NormalizeInodes(rw ReadWriterAt, touched []Extent) (NormalizeStats, error) {
	var st NormalizeStats
	if err := fs.SB.CheckNormalizable(); err != nil {
		return st, err
	}
	touched = mergeExtents(slices.Clone(touched))
	tables := fs.tableOrder()
	n := fs.InodeTableBlocks()
	bs := fs.SB.BlockSize
	block := make([]byte, bs)
	for _, g := range tables {
		t := fs.Groups[g].InodeTable
		i, _ := slices.BinarySearchFunc(touched, t, func(e Extent, b uint64) int {
			if e.Start+e.Len <= b {
				return -1
			}
			return 1
		})
		var bitmap []byte
		for ; i < len(touched) && touched[i].Start < t+n; i++ {
			e := touched[i]
			for b := max(e.Start, t); b < min(e.Start+e.Len, t+n); b++ {
				if bitmap == nil {
					var err error
					if bitmap, err = fs.inodeBitmap(rw, g); err != nil {
						return st, err
					}
				}
				if err := readFull(rw, block, int64(b)*bs); err != nil {
					return st, fmt.Errorf("ext4: read inode table block %d: %w", b, err)
				}
				st.Blocks++
				first := uint32(b-t) * uint32(bs/int64(fs.SB.InodeSize))
				if fs.normalizeBlock(block, bitmap, first, &st) {
					if _, err := rw.WriteAt(block, int64(b)*bs); err != nil {
						return st, fmt.Errorf("ext4: write inode table block %d: %w", b, err)
					}
					st.Written++
				}
			}
		}
	}
	return st, nil
}

// tableOrder lists the groups by inode table position.
func (fs *FS) tableOrder() []int {
	order := make([]int, len(fs.Groups))
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int {
		switch x, y := fs.Groups[a].InodeTable, fs.Groups[b].InodeTable; {
		case x < y:
			return -1
		case x > y:
			return 1
		}
		return 0
	})
	return order
}

// inodeBitmap returns group g's inode bitmap; an uninitialised one (every
// inode free) reads as zeros.
func (fs *FS) inodeBitmap(r io.ReaderAt, g int) ([]byte, error) {
	bitmap := make([]byte, fs.SB.BlockSize)
	if fs.Groups[g].Flags&GroupInodeUninit != 0 {
		return bitmap, nil
	}
	if err := readFull(r, bitmap, int64(fs.Groups[g].InodeBitmap)*fs.SB.BlockSize); err != nil {
		return nil, fmt.Errorf("ext4: read inode bitmap of group %d: %w", g, err)
	}
	return bitmap, nil
}

// normalizeBlock normalises the inodes of one inode table block whose first
// inode has index first in its group; it reports whether it changed any.
func (fs *FS) normalizeBlock(block, bitmap []byte, first uint32, st *NormalizeStats) bool {
	size := int(fs.SB.InodeSize)
	changed := false
	for k := 0; k*size < len(block); k++ {
		idx := first + uint32(k)
		if idx >= fs.SB.InodesPerGroup {
			break
		}
		inode := block[k*size : (k+1)*size]
		before := bytes.Clone(inode)
		if bitmap[idx/8]&(1<<(idx%8)) != 0 {
			normalizeInUse(inode)
			st.InUse++
		} else if !isZero(inode) {
			clear(inode)
			st.Cleared++
		}
		changed = changed || !bytes.Equal(before, inode)
	}
	return changed
}

// normalizeInUse sets an inode's change and creation times to its
// modification time and zeroes its generation and version.
func normalizeInUse(inode []byte) {
	le := binary.LittleEndian
	mtime := le.Uint32(inode[iMtime:])
	le.PutUint32(inode[iCtime:], mtime)
	le.PutUint32(inode[iVersionLo:], 0)
	le.PutUint32(inode[iGeneration:], 0)
	if len(inode) <= goodOldSize {
		return
	}
	extra := int(le.Uint16(inode[iExtraIsize:]))
	if goodOldSize+extra > len(inode) {
		return // not a size the kernel writes: leave the extra fields alone
	}
	has := func(off int) bool { return off+4 <= goodOldSize+extra }
	if !has(iMtimeExtra) {
		return
	}
	mtimeExtra := le.Uint32(inode[iMtimeExtra:])
	le.PutUint32(inode[iCtimeExtra:], mtimeExtra)
	if has(iCrtimeXtra) {
		le.PutUint32(inode[iCrtime:], mtime)
		le.PutUint32(inode[iCrtimeXtra:], mtimeExtra)
	}
	if has(iVersionHi) {
		le.PutUint32(inode[iVersionHi:], 0)
	}
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
