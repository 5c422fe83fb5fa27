// Package ext4 reads the few on-disk structures of an ext4 filesystem that
// the image converter needs (the superblock, the group descriptors, the
// inode tables and bitmaps, the journal inode's extents) and normalises the
// fields a kernel mount fills in from the clock or at random: inode change
// and creation times, generation numbers, i_version counters, freed inodes,
// and the superblock's mount bookkeeping. With them normalised, applying the
// same layer to the same filesystem gives the same bytes.
//
// It reads untrusted images: every size and offset is checked against the
// filesystem's geometry before it is used, and bad input gives an error
// wrapping ErrNotExt4, ErrCorrupt or ErrUnsupported.
package ext4

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Sentinel errors.
var (
	// ErrNotExt4 reports a disk without an ext2/3/4 superblock.
	ErrNotExt4 = errors.New("ext4: not an ext4 filesystem")
	// ErrCorrupt reports geometry or metadata that cannot be right.
	ErrCorrupt = errors.New("ext4: corrupt filesystem")
	// ErrUnsupported reports a valid filesystem using a feature this
	// package cannot normalise (metadata checksums, meta_bg, an external
	// journal).
	ErrUnsupported = errors.New("ext4: unsupported filesystem")
)

// SuperblockOffset is where the primary superblock lives on the disk.
const SuperblockOffset = 1024

// SuperblockSize is the size of the superblock structure.
const SuperblockSize = 1024

// Feature bits this package looks at.
const (
	compatHasJournal    = 0x4
	incompatRecover     = 0x4
	incompatJournalDev  = 0x8
	incompatMetaBG      = 0x10
	incompat64Bit       = 0x80
	roCompatMetadataCsm = 0x400
)

// Limits that keep a corrupt superblock from causing huge allocations.
const (
	maxGroups    = 1 << 20
	maxDescBytes = 64 << 20
)

// Superblock holds the superblock fields the converter uses.
type Superblock struct {
	InodesCount    uint32
	BlocksCount    uint64
	FirstDataBlock uint32
	BlockSize      int64
	BlocksPerGroup uint32
	InodesPerGroup uint32
	InodeSize      uint32
	DescSize       uint32
	Compat         uint32
	Incompat       uint32
	RoCompat       uint32
	JournalInum    uint32
	JournalDev     uint32
	State          uint16
	ErrorCount     uint32
	UUID           [16]byte

	raw [SuperblockSize]byte
}

// Raw returns the superblock's bytes as read.
func (sb *Superblock) Raw() [SuperblockSize]byte { return sb.raw }

// HasJournal says whether the filesystem has an (internal) journal.
func (sb *Superblock) HasJournal() bool { return sb.Compat&compatHasJournal != 0 }

// Groups is the number of block groups.
func (sb *Superblock) Groups() uint64 {
	return (sb.BlocksCount - uint64(sb.FirstDataBlock) + uint64(sb.BlocksPerGroup) - 1) / uint64(sb.BlocksPerGroup)
}

// ReadSuperblock reads and checks the primary superblock of the disk r.
func ReadSuperblock(r io.ReaderAt) (*Superblock, error) {
	sb := &Superblock{}
	if _, err := r.ReadAt(sb.raw[:], SuperblockOffset); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("ext4: read superblock: %w", err)
	}
	b := sb.raw[:]
	le := binary.LittleEndian
	if le.Uint16(b[0x38:]) != 0xEF53 {
		return nil, fmt.Errorf("%w: superblock magic %#x at byte %d", ErrNotExt4, le.Uint16(b[0x38:]), SuperblockOffset+0x38)
	}
	logBS := le.Uint32(b[0x18:])
	if logBS > 6 {
		return nil, fmt.Errorf("%w: block size 2^(10+%d)", ErrCorrupt, logBS)
	}
	*sb = Superblock{
		InodesCount:    le.Uint32(b[0x0:]),
		BlocksCount:    uint64(le.Uint32(b[0x4:])),
		FirstDataBlock: le.Uint32(b[0x14:]),
		BlockSize:      1024 << logBS,
		BlocksPerGroup: le.Uint32(b[0x20:]),
		InodesPerGroup: le.Uint32(b[0x28:]),
		InodeSize:      128,
		DescSize:       32,
		Compat:         le.Uint32(b[0x5C:]),
		Incompat:       le.Uint32(b[0x60:]),
		RoCompat:       le.Uint32(b[0x64:]),
		JournalInum:    le.Uint32(b[0xE0:]),
		JournalDev:     le.Uint32(b[0xE4:]),
		State:          le.Uint16(b[0x3A:]),
		ErrorCount:     le.Uint32(b[0x194:]),
		raw:            sb.raw,
	}
	copy(sb.UUID[:], b[0x68:0x78])
	if le.Uint32(b[0x4C:]) >= 1 { // dynamic revision: variable inode size
		sb.InodeSize = uint32(le.Uint16(b[0x58:]))
	}
	if sb.Incompat&incompat64Bit != 0 {
		sb.BlocksCount |= uint64(le.Uint32(b[0x150:])) << 32
		sb.DescSize = uint32(le.Uint16(b[0xFE:]))
	}
	return sb, sb.check()
}

func (sb *Superblock) check() error {
	bs := uint64(sb.BlockSize)
	switch {
	case sb.BlocksPerGroup == 0 || uint64(sb.BlocksPerGroup) > 8*bs:
		return fmt.Errorf("%w: %d blocks per group with %d-byte blocks", ErrCorrupt, sb.BlocksPerGroup, bs)
	case sb.InodesPerGroup == 0 || uint64(sb.InodesPerGroup) > 8*bs:
		return fmt.Errorf("%w: %d inodes per group with %d-byte blocks", ErrCorrupt, sb.InodesPerGroup, bs)
	case sb.InodeSize < 128 || uint64(sb.InodeSize) > bs || sb.InodeSize&(sb.InodeSize-1) != 0:
		return fmt.Errorf("%w: inode size %d", ErrCorrupt, sb.InodeSize)
	case sb.DescSize < 32 || sb.DescSize > 1024 || sb.DescSize&(sb.DescSize-1) != 0:
		return fmt.Errorf("%w: group descriptor size %d", ErrCorrupt, sb.DescSize)
	case uint64(sb.FirstDataBlock) >= sb.BlocksCount:
		return fmt.Errorf("%w: first data block %d of %d", ErrCorrupt, sb.FirstDataBlock, sb.BlocksCount)
	case sb.BlocksCount > (1<<63)/bs:
		return fmt.Errorf("%w: %d blocks", ErrCorrupt, sb.BlocksCount)
	}
	groups := sb.Groups()
	if groups > maxGroups || groups*uint64(sb.DescSize) > maxDescBytes {
		return fmt.Errorf("%w: %d block groups", ErrUnsupported, groups)
	}
	if uint64(sb.InodesCount) != groups*uint64(sb.InodesPerGroup) {
		return fmt.Errorf("%w: %d inodes, but %d groups of %d", ErrCorrupt, sb.InodesCount, groups, sb.InodesPerGroup)
	}
	return nil
}

// CheckNormalizable reports whether this package can normalise the
// filesystem: metadata checksums would need every checksum recomputed
// (and the generation numbers seed the extent and directory block ones),
// meta_bg places group descriptors elsewhere, and an external journal is
// out of reach.
func (sb *Superblock) CheckNormalizable() error {
	switch {
	case sb.RoCompat&roCompatMetadataCsm != 0:
		return fmt.Errorf("%w: metadata_csum", ErrUnsupported)
	case sb.Incompat&incompatMetaBG != 0:
		return fmt.Errorf("%w: meta_bg", ErrUnsupported)
	case sb.Incompat&incompatJournalDev != 0 || sb.JournalDev != 0:
		return fmt.Errorf("%w: external journal device", ErrUnsupported)
	}
	return nil
}

// Group is one block group's descriptor: where its bitmaps and inode table
// are.
type Group struct {
	BlockBitmap uint64
	InodeBitmap uint64
	InodeTable  uint64
	Flags       uint16
}

// Group descriptor flags.
const (
	GroupInodeUninit = 0x1
	GroupBlockUninit = 0x2
)

// FS is a filesystem's geometry: its superblock and group descriptors.
type FS struct {
	SB     *Superblock
	Groups []Group
}

// Open reads the superblock and group descriptors of the disk r.
func Open(r io.ReaderAt) (*FS, error) {
	sb, err := ReadSuperblock(r)
	if err != nil {
		return nil, err
	}
	if sb.Incompat&incompatMetaBG != 0 {
		return nil, fmt.Errorf("%w: meta_bg", ErrUnsupported)
	}
	n := sb.Groups()
	fs := &FS{SB: sb}
	descOff := (int64(sb.FirstDataBlock) + 1) * sb.BlockSize
	// Read in chunks, so a truncated disk claiming many groups fails before
	// much is allocated.
	const chunk = 1024
	raw := make([]byte, chunk*sb.DescSize)
	for first := uint64(0); first < n; first += chunk {
		k := min(chunk, n-first)
		off := descOff + int64(first)*int64(sb.DescSize)
		if err := readFull(r, raw[:k*uint64(sb.DescSize)], off); err != nil {
			return nil, fmt.Errorf("ext4: read group descriptors %d-%d at %d: %w", first, first+k-1, off, err)
		}
		for i := uint64(0); i < k; i++ {
			g, err := fs.parseGroup(raw[i*uint64(sb.DescSize):], first+i)
			if err != nil {
				return nil, err
			}
			fs.Groups = append(fs.Groups, g)
		}
	}
	if err := fs.checkTables(); err != nil {
		return nil, err
	}
	return fs, nil
}

func (fs *FS) parseGroup(d []byte, i uint64) (Group, error) {
	le := binary.LittleEndian
	g := Group{
		BlockBitmap: uint64(le.Uint32(d[0x0:])),
		InodeBitmap: uint64(le.Uint32(d[0x4:])),
		InodeTable:  uint64(le.Uint32(d[0x8:])),
		Flags:       le.Uint16(d[0x12:]),
	}
	if fs.SB.DescSize >= 64 {
		g.BlockBitmap |= uint64(le.Uint32(d[0x20:])) << 32
		g.InodeBitmap |= uint64(le.Uint32(d[0x24:])) << 32
		g.InodeTable |= uint64(le.Uint32(d[0x28:])) << 32
	}
	if g.InodeTable+fs.InodeTableBlocks() > fs.SB.BlocksCount || g.InodeBitmap >= fs.SB.BlocksCount {
		return g, fmt.Errorf("%w: group %d's inode table at block %d or bitmap at %d is outside the %d blocks",
			ErrCorrupt, i, g.InodeTable, g.InodeBitmap, fs.SB.BlocksCount)
	}
	return g, nil
}

// checkTables rejects inode tables that overlap one another, which no
// mkfs lays out and which would make a walk over them revisit blocks.
func (fs *FS) checkTables() error {
	order := fs.tableOrder()
	n := fs.InodeTableBlocks()
	for i := 1; i < len(order); i++ {
		a, b := fs.Groups[order[i-1]].InodeTable, fs.Groups[order[i]].InodeTable
		if a+n > b {
			return fmt.Errorf("%w: inode tables of groups %d (block %d) and %d (block %d) overlap",
				ErrCorrupt, order[i-1], a, order[i], b)
		}
	}
	return nil
}

// InodeTableBlocks is the length of each group's inode table in blocks.
func (fs *FS) InodeTableBlocks() uint64 {
	bs := uint64(fs.SB.BlockSize)
	return (uint64(fs.SB.InodesPerGroup)*uint64(fs.SB.InodeSize) + bs - 1) / bs
}

// InodeOffset returns the byte offset of inode ino on the disk.
func (fs *FS) InodeOffset(ino uint32) (int64, error) {
	if ino == 0 || ino > fs.SB.InodesCount {
		return 0, fmt.Errorf("%w: inode %d of %d", ErrCorrupt, ino, fs.SB.InodesCount)
	}
	g, idx := (ino-1)/fs.SB.InodesPerGroup, (ino-1)%fs.SB.InodesPerGroup
	return int64(fs.Groups[g].InodeTable)*fs.SB.BlockSize + int64(idx)*int64(fs.SB.InodeSize), nil
}

// ReadInode returns the on-disk bytes of inode ino.
func (fs *FS) ReadInode(r io.ReaderAt, ino uint32) ([]byte, error) {
	off, err := fs.InodeOffset(ino)
	if err != nil {
		return nil, err
	}
	b := make([]byte, fs.SB.InodeSize)
	if err := readFull(r, b, off); err != nil {
		return nil, fmt.Errorf("ext4: read inode %d at %d: %w", ino, off, err)
	}
	return b, nil
}

// readFull reads exactly len(p) bytes at off.
func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return err
}
