// Package tarwrap owns the tar wrapper that overlaybd puts around a layer
// blob: detecting it, exposing the wrapped payload as an io.SectionReader,
// and writing it in upstream's two layouts.
//
// Upstream accepts a blob as wrapped when its first 512 bytes are a POSIX
// ustar header (magic "ustar\x00", version "00", valid checksum). The payload
// then starts at byte 512, or at byte 1536 when the first header is a PAX
// extended header (typeflag 'x') whose records fit one block and are followed
// by the ustar header of the payload file. overlaybd-commit writes the PAX
// layout (records "size=<len>", payload header size 0); the converter writes a
// single plain ustar header. GNU tar headers ("ustar  ") are not wrappers.
package tarwrap

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// BlockSize is the tar block size: headers, PAX records and padding are
// all multiples of it.
const BlockSize = 512

const (
	// CommitName is the file name upstream gives the wrapped layer.
	CommitName = "overlaybd.commit"
	// PAXName is the name upstream gives the PAX extended header.
	PAXName = "overlaybd.pax"

	paxPayloadOffset   = 3 * BlockSize
	plainPayloadOffset = BlockSize
)

var (
	// ErrMalformed reports a blob that starts with a valid ustar header but
	// is not a well-formed overlaybd tar wrapper.
	ErrMalformed = errors.New("tarwrap: malformed tar wrapper")
	// ErrTruncated reports a wrapper whose headers or payload extend past
	// the end of the blob.
	ErrTruncated = errors.New("tarwrap: truncated tar wrapper")
)

// ustar header field offsets and widths (POSIX.1-1988).
const (
	offName     = 0
	lenName     = 100
	offMode     = 100
	offUID      = 108
	offGID      = 116
	offSize     = 124
	lenSize     = 12
	offMtime    = 136
	offChksum   = 148
	lenChksum   = 8
	offTypeflag = 156
	offMagic    = 257
	offVersion  = 263
	offUname    = 265
	offGname    = 297

	typePAX      = 'x'
	typeReg      = '0'
	typeRegOld   = 0 // pre-POSIX regular file
	magicUSTAR   = "ustar\x00"
	versionUSTAR = "00"
)

// Detect reports where the payload of a tar-wrapped blob of the given size
// lies. ok is false, with a nil error, when the blob does not start with a
// POSIX ustar header (so it is not wrapped and should be read as is). An
// error means the blob starts like a wrapper but is malformed or truncated.
func Detect(r io.ReaderAt, size int64) (payloadOffset, payloadSize int64, ok bool, err error) {
	if size < BlockSize {
		return 0, 0, false, nil
	}
	var hdr [BlockSize]byte
	if err := readFull(r, hdr[:], 0); err != nil {
		return 0, 0, false, fmt.Errorf("tarwrap: read first header: %w", err)
	}
	if !hasUSTARMagic(&hdr) {
		return 0, 0, false, nil
	}
	// Upstream would silently treat such a blob as unwrapped and then fail
	// on it as a ZFile; naming the real fault is kinder.
	if !checksumOK(&hdr) {
		return 0, 0, false, fmt.Errorf("%w: header at 0 has the ustar magic but a bad checksum", ErrMalformed)
	}
	switch hdr[offTypeflag] {
	case typePAX:
		payloadOffset, payloadSize, err = detectPAX(r, size, &hdr)
	case typeReg, typeRegOld:
		payloadOffset = plainPayloadOffset
		payloadSize, err = parseNumeric(hdr[offSize : offSize+lenSize])
		if err != nil {
			err = fmt.Errorf("%w: header at 0: size field: %v", ErrMalformed, err)
		}
	default:
		err = fmt.Errorf("%w: header at 0: typeflag %q, want a regular file or a PAX header",
			ErrMalformed, hdr[offTypeflag])
	}
	if err != nil {
		return 0, 0, false, err
	}
	if payloadSize > size-payloadOffset {
		return 0, 0, false, fmt.Errorf("%w: payload of %d bytes at offset %d exceeds blob size %d",
			ErrTruncated, payloadSize, payloadOffset, size)
	}
	return payloadOffset, payloadSize, true, nil
}

// NewReader returns the payload of a tar-wrapped blob, and wrapped=true; or
// the whole blob, and wrapped=false, when it carries no wrapper.
func NewReader(r io.ReaderAt, size int64) (payload *io.SectionReader, wrapped bool, err error) {
	off, n, ok, err := Detect(r, size)
	if err != nil {
		return nil, false, err
	}
	if !ok {
		return io.NewSectionReader(r, 0, size), false, nil
	}
	return io.NewSectionReader(r, off, n), true, nil
}

// detectPAX handles the committer's layout: PAX header, one block of
// records, then the payload's own ustar header.
func detectPAX(r io.ReaderAt, size int64, pax *[BlockSize]byte) (int64, int64, error) {
	recLen, err := parseNumeric(pax[offSize : offSize+lenSize])
	if err != nil {
		return 0, 0, fmt.Errorf("%w: PAX header at 0: size field: %v", ErrMalformed, err)
	}
	// Upstream always places the payload at 1536, which only holds when the
	// records fit the single block between the two headers.
	if recLen <= 0 || recLen > BlockSize {
		return 0, 0, fmt.Errorf("%w: PAX header at 0: records of %d bytes, want 1..%d",
			ErrMalformed, recLen, BlockSize)
	}
	if size < paxPayloadOffset {
		return 0, 0, fmt.Errorf("%w: PAX layout needs %d bytes of headers, blob has %d",
			ErrTruncated, paxPayloadOffset, size)
	}
	var blocks [2 * BlockSize]byte
	if err := readFull(r, blocks[:], BlockSize); err != nil {
		return 0, 0, fmt.Errorf("tarwrap: read PAX records: %w", err)
	}
	payloadSize, err := paxSize(blocks[:recLen])
	if err != nil {
		return 0, 0, err
	}
	next := (*[BlockSize]byte)(blocks[BlockSize:])
	if !hasUSTARMagic(next) || !checksumOK(next) {
		return 0, 0, fmt.Errorf("%w: no valid ustar header at offset %d after the PAX records",
			ErrMalformed, 2*BlockSize)
	}
	if t := next[offTypeflag]; t != typeReg && t != typeRegOld {
		return 0, 0, fmt.Errorf("%w: header at %d: typeflag %q, want a regular file",
			ErrMalformed, 2*BlockSize, t)
	}
	return paxPayloadOffset, payloadSize, nil
}

// paxSize returns the value of the last "size" record in recs (later
// records override earlier ones in PAX).
func paxSize(recs []byte) (int64, error) {
	size := int64(-1)
	for off := 0; off < len(recs); {
		key, val, n, err := parsePAXRecord(recs[off:])
		if err != nil {
			return 0, fmt.Errorf("%w: PAX record at offset %d: %v", ErrMalformed, BlockSize+off, err)
		}
		if key == "size" {
			v, err := strconv.ParseInt(val, 10, 64)
			if err != nil || v < 0 {
				return 0, fmt.Errorf("%w: PAX size record %q is not a byte count", ErrMalformed, val)
			}
			size = v
		}
		off += n
	}
	if size < 0 {
		return 0, fmt.Errorf("%w: PAX header has no size record", ErrMalformed)
	}
	return size, nil
}

// parsePAXRecord parses one "<len> <key>=<value>\n" record, where len
// counts the whole record including itself, and returns its length.
func parsePAXRecord(b []byte) (key, val string, n int, err error) {
	sp := bytes.IndexByte(b, ' ')
	if sp <= 0 || sp > 20 {
		return "", "", 0, errors.New("no length prefix")
	}
	n64, err := strconv.ParseUint(string(b[:sp]), 10, 32)
	if err != nil || n64 <= uint64(sp)+1 || n64 > uint64(len(b)) {
		return "", "", 0, fmt.Errorf("bad length %q", b[:sp])
	}
	n = int(n64)
	rec := b[sp+1 : n]
	if rec[len(rec)-1] != '\n' {
		return "", "", 0, errors.New("not newline-terminated")
	}
	k, v, found := bytes.Cut(rec[:len(rec)-1], []byte{'='})
	if !found || len(k) == 0 {
		return "", "", 0, errors.New("no key=value")
	}
	return string(k), string(v), n, nil
}

// hasUSTARMagic reports whether h carries the POSIX ustar magic and version
// (GNU tar's "ustar  " does not qualify).
func hasUSTARMagic(h *[BlockSize]byte) bool {
	return string(h[offMagic:offMagic+6]) == magicUSTAR && string(h[offVersion:offVersion+2]) == versionUSTAR
}

// checksumOK reports whether h's checksum field matches its contents.
func checksumOK(h *[BlockSize]byte) bool {
	want, err := parseNumeric(h[offChksum : offChksum+lenChksum])
	if err != nil {
		return false
	}
	unsigned, signed := checksums(h)
	return want == unsigned || want == signed
}

// checksums returns the header sum with the checksum field read as spaces,
// over unsigned and over signed bytes: historic tars used either.
func checksums(h *[BlockSize]byte) (unsigned, signed int64) {
	for i, c := range h {
		if i >= offChksum && i < offChksum+lenChksum {
			c = ' '
		}
		unsigned += int64(c)
		signed += int64(int8(c))
	}
	return unsigned, signed
}

// parseNumeric decodes a tar numeric field: octal text padded with spaces
// or NULs, or big-endian base-256 when the top bit of the first byte is set.
func parseNumeric(b []byte) (int64, error) {
	if len(b) > 0 && b[0]&0x80 != 0 {
		if b[0]&0x40 != 0 {
			return 0, errors.New("negative base-256 number")
		}
		var v uint64
		for i, c := range b {
			if i == 0 {
				c &= 0x7f
			}
			if v>>56 != 0 {
				return 0, errors.New("base-256 number overflows int64")
			}
			v = v<<8 | uint64(c)
		}
		if v > 1<<63-1 {
			return 0, errors.New("base-256 number overflows int64")
		}
		return int64(v), nil
	}
	s := bytes.Trim(b, " \x00")
	if len(s) == 0 {
		return 0, nil
	}
	v, err := strconv.ParseInt(string(s), 8, 64)
	if err != nil {
		return 0, fmt.Errorf("bad octal number %q", b)
	}
	return v, nil
}

// readFull reads exactly len(p) bytes at off, accepting io.EOF with a full
// read as the io.ReaderAt contract allows.
func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("%d of %d bytes at offset %d: %w", n, len(p), off, err)
}
