package lsmt

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
)

// Sentinel errors. Every error this package returns for bad input wraps one
// of them, with what was wrong and where.
var (
	ErrNotLSMT      = errors.New("lsmt: not an LSMT layer")
	ErrCorruptIndex = errors.New("lsmt: corrupt index")
	ErrCorrupt      = errors.New("lsmt: corrupt layer")
	ErrAlignment    = errors.New("lsmt: offset or length not sector aligned")
)

// HeaderSize is the slot a header or trailer occupies.
const HeaderSize = 4096

// headerStructSize is the size field upstream stores: sizeof(HeaderTrailer).
const headerStructSize = 390

const uuidTextLen = 37

var (
	magic0 = [8]byte{'L', 'S', 'M', 'T', 0, 1, 2, 0}
	magic1 = [16]byte{0x65, 0x7E, 0x63, 0xD2, 0x94, 0x44, 0x08, 0x4C,
		0xA2, 0xD2, 0xC8, 0xEC, 0x4F, 0xCF, 0xAE, 0x8A}
)

// Header flag bits.
const (
	FlagHeader = 1 << 0 // set in a header, clear in a trailer
	FlagData   = 1 << 1 // data file (clear: index file of a writable layer)
	FlagSealed = 1 << 2
	FlagSparse = 1 << 4 // sparse writable layer
)

// Header is the content of an LSMT header or trailer slot.
type Header struct {
	Flags       uint32
	IndexOffset uint64 // bytes
	IndexSize   uint64 // entries, padding included
	VirtualSize uint64 // bytes
	UUID        string // 36 characters, or empty
	ParentUUID  string
	Version     uint8
	SubVersion  uint8
	UserTag     string // commit message
}

// IsHeader, IsData and IsSealed report the flag bits readers check.
func (h Header) IsHeader() bool { return h.Flags&FlagHeader != 0 }
func (h Header) IsData() bool   { return h.Flags&FlagData != 0 }
func (h Header) IsSealed() bool { return h.Flags&FlagSealed != 0 }

// HasMagic reports whether b starts with the LSMT magic.
func HasMagic(b []byte) bool {
	return len(b) >= 24 && bytes.Equal(b[:8], magic0[:]) && bytes.Equal(b[8:24], magic1[:])
}

// parseHeader decodes a header or trailer slot. Old layers carry garbage in
// unused fields, so only the magic is checked here; callers check the flag
// bits they need.
func parseHeader(b []byte, where string) (Header, error) {
	if len(b) < headerStructSize {
		return Header{}, fmt.Errorf("%w: %s slot is %d bytes", ErrNotLSMT, where, len(b))
	}
	if !HasMagic(b) {
		return Header{}, fmt.Errorf("%w: %s: bad magic % x", ErrNotLSMT, where, b[:8])
	}
	le := binary.LittleEndian
	return Header{
		Flags:       le.Uint32(b[28:]),
		IndexOffset: le.Uint64(b[32:]),
		IndexSize:   le.Uint64(b[40:]),
		VirtualSize: le.Uint64(b[48:]),
		UUID:        cString(b[56 : 56+uuidTextLen]),
		ParentUUID:  cString(b[93 : 93+uuidTextLen]),
		Version:     b[132],
		SubVersion:  b[133],
		UserTag:     cString(b[134 : 134+256]),
	}, nil
}

// marshal encodes h into a zeroed 4 KiB slot as upstream's
// write_header_trailer does.
func (h Header) marshal() ([]byte, error) {
	if len(h.UserTag) > 256 {
		return nil, fmt.Errorf("lsmt: user tag is %d bytes, at most 256", len(h.UserTag))
	}
	for _, u := range []string{h.UUID, h.ParentUUID} {
		if len(u) >= uuidTextLen {
			return nil, fmt.Errorf("lsmt: uuid %q longer than %d characters", u, uuidTextLen-1)
		}
	}
	b := make([]byte, HeaderSize)
	copy(b, magic0[:])
	copy(b[8:], magic1[:])
	le := binary.LittleEndian
	le.PutUint32(b[24:], headerStructSize)
	le.PutUint32(b[28:], h.Flags)
	le.PutUint64(b[32:], h.IndexOffset)
	le.PutUint64(b[40:], h.IndexSize)
	le.PutUint64(b[48:], h.VirtualSize)
	copy(b[56:], uuidOrNull(h.UUID))
	copy(b[93:], uuidOrNull(h.ParentUUID))
	b[132], b[133] = h.Version, h.SubVersion
	copy(b[134:], h.UserTag)
	return b, nil
}

// nullUUID is how upstream writes an absent uuid: the text form of all zeros.
const nullUUID = "00000000-0000-0000-0000-000000000000"

func uuidOrNull(u string) string {
	if u == "" {
		return nullUUID
	}
	return u
}

func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}
