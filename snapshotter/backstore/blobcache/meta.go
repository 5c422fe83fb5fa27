package blobcache

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math/bits"

	"github.com/opencontainers/go-digest"
)

// The meta file sits beside each blob's sparse data file and records which
// blocks are cached, with a CRC32C of every 4 KiB page of them, so a small
// read verifies only the pages it touches. Layout (little-endian):
//
//	header, metaHeaderSize bytes:
//	  0  [8]  magic "OBDBCMT1"
//	  8  u32  version (1)
//	  12 u32  block size
//	  16 u64  blob size
//	  24 u32  flags (bit 0: complete, digest verified)
//	  28 u16  digest length
//	  30 u16  zero
//	  32 [..] digest string, zero padded
//	  252 u32 CRC32C (Castagnoli, standard) of bytes [0, 252)
//	marks, one u32 per block: markPresent when cached, else 0
//	page CRCs, one u32 per 4 KiB page of the blob: CRC32C of the page
//
// Crash ordering: a fill writes the data, fsyncs it, then writes the page
// CRCs and only then the block marks. A crash can lose marks (the block is
// fetched again) but cannot leave a mark over data that is not on disk; a
// mark that reached the disk before its CRCs still sits over durable data,
// and stale CRCs at worst cause one needless refetch. Each mark is one
// aligned 4-byte write, so it is never torn; an unknown mark
// value reads as absent. The header is rewritten in place (one 256-byte
// write in the first sector) only to flip the complete flag; a torn header
// fails its CRC and the blob's cache is discarded.
const (
	metaMagic      = "OBDBCMT1"
	metaVersion    = 1
	metaHeaderSize = 256
	metaDigestOff  = 32
	metaCRCOff     = metaHeaderSize - 4
	maxDigestLen   = metaCRCOff - metaDigestOff
	markPresent    = 0x52455350 // "PSER": distinguishes a written mark from zeros
	pageSize       = 4 << 10    // checksum granularity

	flagComplete = 1 << 0

	minBlockSize = pageSize
	maxBlockSize = 16 << 20
	// maxBlobSize bounds what a meta file may describe, and so the memory of
	// a parsed presence map: 64M page CRCs (256 MiB) for a 256 GiB blob.
	maxBlobSize = 1 << 38
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// blockCRC is the standard (inverted) CRC32C, so an all-zero block, such as a
// punched hole, never matches a zero record.
func blockCRC(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }

// meta is a parsed meta file.
type meta struct {
	digest    digest.Digest
	blockSize int64
	blobSize  int64
	complete  bool
	present   []bool   // per block
	crcs      []uint32 // per page
}

func numBlocks(size, blockSize int64) int64 { return (size + blockSize - 1) / blockSize }

func validBlockSize(bs int64) bool {
	return bs >= minBlockSize && bs <= maxBlockSize && bits.OnesCount64(uint64(bs)) == 1
}

// metaLayout gives the offsets of the mark and CRC regions of a meta file.
type metaLayout struct{ marks, crcs, size int64 }

func layoutFor(blobSize, blockSize int64) metaLayout {
	marks := int64(metaHeaderSize)
	crcs := marks + 4*numBlocks(blobSize, blockSize)
	return metaLayout{marks: marks, crcs: crcs, size: crcs + 4*numBlocks(blobSize, pageSize)}
}

// encodeHeader returns the header bytes for a blob.
func encodeHeader(dgst digest.Digest, blockSize, blobSize int64, complete bool) []byte {
	h := make([]byte, metaHeaderSize)
	copy(h, metaMagic)
	binary.LittleEndian.PutUint32(h[8:], metaVersion)
	binary.LittleEndian.PutUint32(h[12:], uint32(blockSize))
	binary.LittleEndian.PutUint64(h[16:], uint64(blobSize))
	if complete {
		binary.LittleEndian.PutUint32(h[24:], flagComplete)
	}
	binary.LittleEndian.PutUint16(h[28:], uint16(len(dgst)))
	copy(h[metaDigestOff:metaCRCOff], dgst)
	binary.LittleEndian.PutUint32(h[metaCRCOff:], crc32.Checksum(h[:metaCRCOff], castagnoli))
	return h
}

// parseHeader checks a meta header and returns its fields.
func parseHeader(h []byte) (dgst digest.Digest, blockSize, blobSize int64, complete bool, err error) {
	if len(h) < metaHeaderSize {
		return "", 0, 0, false, fmt.Errorf("%w: %d bytes, shorter than the %d-byte header", ErrInvalidMeta, len(h), metaHeaderSize)
	}
	if string(h[:8]) != metaMagic {
		return "", 0, 0, false, fmt.Errorf("%w: bad magic %q", ErrInvalidMeta, h[:8])
	}
	if got, want := binary.LittleEndian.Uint32(h[metaCRCOff:]), crc32.Checksum(h[:metaCRCOff], castagnoli); got != want {
		return "", 0, 0, false, fmt.Errorf("%w: header checksum %#x, computed %#x", ErrInvalidMeta, got, want)
	}
	if v := binary.LittleEndian.Uint32(h[8:]); v != metaVersion {
		return "", 0, 0, false, fmt.Errorf("%w: version %d, want %d", ErrInvalidMeta, v, metaVersion)
	}
	blockSize = int64(binary.LittleEndian.Uint32(h[12:]))
	if !validBlockSize(blockSize) {
		return "", 0, 0, false, fmt.Errorf("%w: block size %d", ErrInvalidMeta, blockSize)
	}
	size := binary.LittleEndian.Uint64(h[16:])
	if size > maxBlobSize {
		return "", 0, 0, false, fmt.Errorf("%w: blob size %d above the %d limit", ErrInvalidMeta, size, int64(maxBlobSize))
	}
	flags := binary.LittleEndian.Uint32(h[24:])
	if flags&^flagComplete != 0 {
		return "", 0, 0, false, fmt.Errorf("%w: unknown flags %#x", ErrInvalidMeta, flags)
	}
	n := int(binary.LittleEndian.Uint16(h[28:]))
	if n > maxDigestLen {
		return "", 0, 0, false, fmt.Errorf("%w: digest length %d", ErrInvalidMeta, n)
	}
	dgst = digest.Digest(h[metaDigestOff : metaDigestOff+n])
	if err := dgst.Validate(); err != nil {
		return "", 0, 0, false, fmt.Errorf("%w: digest %q: %w", ErrInvalidMeta, dgst, err)
	}
	return dgst, blockSize, int64(size), flags&flagComplete != 0, nil
}

// parseMeta parses a whole meta file. A block whose mark is not markPresent
// (never written, cleared, or damaged) reads as absent, so one bad mark
// costs one block, not the blob.
func parseMeta(data []byte) (*meta, error) {
	dgst, bs, size, complete, err := parseHeader(data)
	if err != nil {
		return nil, err
	}
	l := layoutFor(size, bs)
	if int64(len(data)) != l.size {
		return nil, fmt.Errorf("%w: %d bytes, want %d for a %d-byte blob in %d-byte blocks", ErrInvalidMeta, len(data), l.size, size, bs)
	}
	m := &meta{
		digest: dgst, blockSize: bs, blobSize: size,
		present: make([]bool, numBlocks(size, bs)),
		crcs:    make([]uint32, numBlocks(size, pageSize)),
	}
	all := true
	for i := range m.present {
		m.present[i] = binary.LittleEndian.Uint32(data[l.marks+int64(i)*4:]) == markPresent
		all = all && m.present[i]
	}
	for i := range m.crcs {
		m.crcs[i] = binary.LittleEndian.Uint32(data[l.crcs+int64(i)*4:])
	}
	// The flag is only trusted when every mark agrees.
	m.complete = complete && all
	return m, nil
}
