// Package zfile owns overlaybd's ZFile format: a seekable compressed file
// made of fixed-size blocks (LZ4 raw blocks or ZSTD frames), each optionally
// followed by a CRC32C, then a jump table of stored block lengths and a
// 512-byte trailer. Reader gives random access (io.ReaderAt) to the
// uncompressed bytes; Writer produces files upstream's reader accepts, with
// the same header and trailer flags upstream's converter writes.
//
// Layout: header (512) | blocks [payload, crc32c?]... | jump table (u32 per
// block) | trailer (512). All integers are little-endian.
package zfile

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"strconv"
	"strings"

	"github.com/obdtrace/obdtrace/internal/crc32c"
)

// HeaderSize is the size of the header and trailer slots.
const HeaderSize = 512

const (
	structSize = 96 // the HeaderTrailer struct at the start of each slot

	minBlockSize = 4 << 10
	maxBlockSize = 64 << 10

	// maxIndexSize is upstream's MAX_ZFILE_INDEX_SIZE (number of blocks).
	maxIndexSize = 1_000_000_000

	crcSize = 4
)

var (
	magic0 = [8]byte{'Z', 'F', 'i', 'l', 'e', 0, 1, 0}
	magic1 = [16]byte{'t', 'u', 'j', 'i', '.', 'y', 'y', 'f', '@', 'A', 'l', 'i', 'b', 'a', 'b', 'a'}
)

var (
	// ErrNotZFile reports data that does not start with the ZFile magic.
	ErrNotZFile = errors.New("zfile: not a ZFile")
	// ErrCorrupt reports a structurally invalid ZFile: inconsistent header,
	// trailer or jump table, or a block that does not decompress to its size.
	ErrCorrupt = errors.New("zfile: corrupt")
	// ErrChecksum reports a header digest, jump table CRC or block CRC mismatch.
	ErrChecksum = errors.New("zfile: checksum mismatch")
	// ErrUnsupported reports a valid-looking ZFile using a feature this
	// package does not implement (an unknown algorithm, a dictionary).
	ErrUnsupported = errors.New("zfile: unsupported")
	// ErrTruncated reports a ZFile shorter than its metadata says.
	ErrTruncated = errors.New("zfile: truncated")
)

// Algorithm is the block compression algorithm.
type Algorithm uint8

const (
	// MiniLZO is upstream's algorithm 0; it is not supported.
	MiniLZO Algorithm = 0
	// LZ4 stores each block in the LZ4 raw block format (no frame).
	LZ4 Algorithm = 1
	// ZSTD stores each block as one standard Zstandard frame.
	ZSTD Algorithm = 2
)

// String names the algorithm.
func (a Algorithm) String() string {
	switch a {
	case MiniLZO:
		return "minilzo"
	case LZ4:
		return "lz4"
	case ZSTD:
		return "zstd"
	}
	return "Algorithm(" + strconv.Itoa(int(a)) + ")"
}

// ParseAlgorithm returns the algorithm a writer can use named name ("lz4"
// or "zstd", in any case), as String spells it. MiniLZO, which no writer
// supports, and unknown names wrap ErrUnsupported.
func ParseAlgorithm(name string) (Algorithm, error) {
	switch strings.ToLower(name) {
	case "lz4":
		return LZ4, nil
	case "zstd":
		return ZSTD, nil
	}
	return 0, fmt.Errorf("%w: compression %q: want lz4 or zstd", ErrUnsupported, name)
}

// Flags are the header/trailer flag bits. Old files carry garbage in the
// upper bits, so only the named bits are meaningful.
type Flags uint64

// Flag bits, as upstream's FLAG_SHIFT_* constants.
const (
	FlagHeader          Flags = 1 << 0 // set in the header slot, clear in the trailer
	FlagDataFile        Flags = 1 << 1 // always set by upstream
	FlagSealed          Flags = 1 << 2 // set in the trailer
	FlagHeaderOverwrite Flags = 1 << 3 // header carries the final trailer info
	FlagDigest          Flags = 1 << 4 // slot digest and jump-table CRC are valid
)

// Has reports whether all bits of f2 are set in f.
func (f Flags) Has(f2 Flags) bool { return f&f2 == f2 }

// String lists the named bits that are set, e.g. "header|data|digest".
func (f Flags) String() string {
	names := []string{"header", "data", "sealed", "overwrite", "digest"}
	var parts []string
	for i, n := range names {
		if f&(1<<i) != 0 {
			parts = append(parts, n)
		}
	}
	if len(parts) == 0 {
		return "0"
	}
	return strings.Join(parts, "|")
}

// Header is the decoded 96-byte struct at the start of a header or trailer
// slot. In a header without FlagHeaderOverwrite the index fields are not
// meaningful (zero, or garbage in old files); the trailer carries them.
type Header struct {
	Flags        Flags
	Digest       uint32 // raw CRC32C (seed 0) of the 512-byte slot with this field zeroed
	IndexOffset  uint64 // byte offset of the jump table
	IndexSize    uint64 // number of blocks (jump table entries)
	OriginalSize uint64 // uncompressed size
	IndexCRC     uint32 // raw CRC32C (seed 0) of the jump table bytes
	BlockSize    uint32
	Algorithm    Algorithm
	Level        uint8 // informational; upstream writes 0
	UseDict      bool
	DictSize     uint32
	Verify       bool // each block is followed by its CRC32C (seed 100007)
}

// parseSlot decodes a 512-byte slot, checking the magic and struct size.
func parseSlot(b *[HeaderSize]byte, where string) (Header, error) {
	if [8]byte(b[0:8]) != magic0 || [16]byte(b[8:24]) != magic1 {
		return Header{}, fmt.Errorf("%w: bad magic in the %s", ErrNotZFile, where)
	}
	le := binary.LittleEndian
	if n := le.Uint32(b[24:]); n != structSize {
		return Header{}, fmt.Errorf("%w: %s struct size %d, want %d", ErrCorrupt, where, n, structSize)
	}
	return Header{
		Digest:       le.Uint32(b[28:]),
		Flags:        Flags(le.Uint64(b[32:])),
		IndexOffset:  le.Uint64(b[40:]),
		IndexSize:    le.Uint64(b[48:]),
		OriginalSize: le.Uint64(b[56:]),
		IndexCRC:     le.Uint32(b[64:]),
		BlockSize:    le.Uint32(b[72:]),
		Algorithm:    Algorithm(b[76]),
		Level:        b[77],
		UseDict:      b[78] != 0,
		DictSize:     le.Uint32(b[84:]),
		Verify:       b[88] != 0,
	}, nil
}

// marshal encodes h into a zero-padded 512-byte slot, computing the digest
// when FlagDigest is set.
func (h Header) marshal() *[HeaderSize]byte {
	var b [HeaderSize]byte
	le := binary.LittleEndian
	copy(b[0:], magic0[:])
	copy(b[8:], magic1[:])
	le.PutUint32(b[24:], structSize)
	le.PutUint64(b[32:], uint64(h.Flags))
	le.PutUint64(b[40:], h.IndexOffset)
	le.PutUint64(b[48:], h.IndexSize)
	le.PutUint64(b[56:], h.OriginalSize)
	le.PutUint32(b[64:], h.IndexCRC)
	le.PutUint32(b[72:], h.BlockSize)
	b[76] = byte(h.Algorithm)
	b[77] = h.Level
	b[78] = boolByte(h.UseDict)
	le.PutUint32(b[84:], h.DictSize)
	b[88] = boolByte(h.Verify)
	if h.Flags.Has(FlagDigest) {
		le.PutUint32(b[28:], slotDigest(&b))
	}
	return &b
}

// slotDigest is upstream's digest: raw CRC32C, seed 0, over the whole slot
// with the digest field zeroed (upstream's spec says bytes 28..511; its code
// and real blobs say otherwise).
func slotDigest(b *[HeaderSize]byte) uint32 {
	c := *b
	binary.LittleEndian.PutUint32(c[28:], 0)
	return crc32c.Update(0, c[:])
}

// checkDigest verifies the slot digest when the slot says it has one.
func checkDigest(b *[HeaderSize]byte, h Header, where string) error {
	if !h.Flags.Has(FlagDigest) {
		return nil
	}
	if got := slotDigest(b); got != h.Digest {
		return fmt.Errorf("%w: %s digest %#08x, computed %#08x", ErrChecksum, where, h.Digest, got)
	}
	return nil
}

// checkOptions validates the compression options of the slot the reader
// takes its layout from.
func (h Header) checkOptions() error {
	switch h.Algorithm {
	case LZ4, ZSTD:
	default:
		return fmt.Errorf("%w: compression algorithm %v", ErrUnsupported, h.Algorithm)
	}
	bs := h.BlockSize
	if bs == 0 || bits.OnesCount32(bs) != 1 {
		return fmt.Errorf("%w: block size %d is not a power of two", ErrCorrupt, bs)
	}
	if bs < minBlockSize || bs > maxBlockSize {
		return fmt.Errorf("%w: block size %d outside %d..%d", ErrUnsupported, bs, minBlockSize, maxBlockSize)
	}
	if h.UseDict {
		return fmt.Errorf("%w: compression dictionary (dict_size %d)", ErrUnsupported, h.DictSize)
	}
	return nil
}

// maxStoredLen bounds one block's stored length: above both LZ4's and
// ZSTD's worst-case expansion of a block, plus its CRC.
func maxStoredLen(blockSize int) int { return blockSize + blockSize/128 + 128 + crcSize }

func boolByte(b bool) byte {
	if b {
		return 1
	}
	return 0
}

// IsZFile reports whether the 512 bytes at the start of r carry the ZFile
// magic. It reads nothing else and validates nothing else.
func IsZFile(r io.ReaderAt, size int64) (bool, error) {
	if size < HeaderSize {
		return false, nil
	}
	var b [24]byte
	if err := readFull(r, b[:], 0); err != nil {
		return false, fmt.Errorf("zfile: read magic: %w", err)
	}
	return [8]byte(b[0:8]) == magic0 && [16]byte(b[8:24]) == magic1, nil
}
