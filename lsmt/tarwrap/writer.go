package tarwrap

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// Format selects one of upstream's two wrapper layouts.
type Format int

const (
	// FormatPAX is overlaybd-commit's layout: a PAX header named
	// "overlaybd.pax" with the record "size=<len>", a ustar header for the
	// payload with size 0, the payload at byte 1536, padding, two zero blocks.
	FormatPAX Format = iota
	// FormatUSTAR is the converter's layout: one plain ustar header carrying
	// the payload size (mode 0444), the payload at byte 512, padding, two
	// zero blocks. The payload must be smaller than 8 GiB.
	FormatUSTAR
)

// String names the format.
func (f Format) String() string {
	switch f {
	case FormatPAX:
		return "pax"
	case FormatUSTAR:
		return "ustar"
	}
	return "Format(" + strconv.Itoa(int(f)) + ")"
}

var (
	// ErrWriteTooLong reports a write past the payload size given up front.
	ErrWriteTooLong = errors.New("tarwrap: write past the declared payload size")
	// ErrShortPayload reports a Close before the declared payload size was written.
	ErrShortPayload = errors.New("tarwrap: payload shorter than declared")
)

// Option configures a Writer.
type Option func(*options)

type options struct{ format Format }

// WithFormat selects the layout; the default is FormatPAX.
func WithFormat(f Format) Option { return func(o *options) { o.format = f } }

// Writer streams a payload of known size into a tar wrapper. Its output is
// deterministic: mtime 0, uid/gid 0, fixed modes.
type Writer struct {
	w       io.Writer
	tw      *tar.Writer // FormatUSTAR only
	size    int64
	written int64
	closed  bool
}

// NewWriter writes the wrapper's headers for a payload called name of
// exactly size bytes and returns a Writer for the payload. Close writes the
// padding and end-of-archive blocks; it does not close w.
func NewWriter(w io.Writer, name string, size int64, opts ...Option) (*Writer, error) {
	o := options{format: FormatPAX}
	for _, opt := range opts {
		opt(&o)
	}
	if name == "" || len(name) >= lenName || strings.IndexByte(name, 0) >= 0 {
		return nil, fmt.Errorf("tarwrap: name %q: want 1..%d bytes without NUL", name, lenName-1)
	}
	if size < 0 {
		return nil, fmt.Errorf("tarwrap: negative payload size %d", size)
	}
	tw := &Writer{w: w, size: size}
	switch o.format {
	case FormatPAX:
		if _, err := w.Write(paxHeaders(name, size)); err != nil {
			return nil, fmt.Errorf("tarwrap: write headers: %w", err)
		}
	case FormatUSTAR:
		tw.tw = tar.NewWriter(w)
		// archive/tar produces exactly the converter's bytes here (the
		// converter uses it with these fields), so no hand-built header.
		err := tw.tw.WriteHeader(&tar.Header{
			Name:     name,
			Mode:     0o444,
			Size:     size,
			Typeflag: tar.TypeReg,
			ModTime:  time.Time{},
			Format:   tar.FormatUSTAR,
		})
		if err != nil {
			return nil, fmt.Errorf("tarwrap: write ustar header: %w", err)
		}
	default:
		return nil, fmt.Errorf("tarwrap: unknown format %v", o.format)
	}
	return tw, nil
}

// Write writes payload bytes; writing more than the declared size fails
// with ErrWriteTooLong and writes nothing.
func (t *Writer) Write(p []byte) (int, error) {
	if t.closed {
		return 0, errors.New("tarwrap: write after close")
	}
	if int64(len(p)) > t.size-t.written {
		return 0, fmt.Errorf("%w: %d bytes at payload offset %d, size %d",
			ErrWriteTooLong, len(p), t.written, t.size)
	}
	var n int
	var err error
	if t.tw != nil {
		n, err = t.tw.Write(p)
	} else {
		n, err = t.w.Write(p)
	}
	t.written += int64(n)
	return n, err
}

// Close pads the payload to a block boundary and writes the two zero blocks
// that end a tar archive. It fails with ErrShortPayload when fewer bytes than
// declared were written.
func (t *Writer) Close() error {
	if t.closed {
		return nil
	}
	t.closed = true
	if t.written != t.size {
		return fmt.Errorf("%w: wrote %d of %d bytes", ErrShortPayload, t.written, t.size)
	}
	if t.tw != nil {
		if err := t.tw.Close(); err != nil {
			return fmt.Errorf("tarwrap: close: %w", err)
		}
		return nil
	}
	pad := (BlockSize - t.size%BlockSize) % BlockSize
	var zeros [3 * BlockSize]byte
	if _, err := t.w.Write(zeros[:pad+2*BlockSize]); err != nil {
		return fmt.Errorf("tarwrap: write trailer: %w", err)
	}
	return nil
}

// Write wraps a payload of exactly size bytes read from payload and writes
// the whole wrapped blob to w.
func Write(w io.Writer, name string, payload io.Reader, size int64, opts ...Option) error {
	tw, err := NewWriter(w, name, size, opts...)
	if err != nil {
		return err
	}
	n, err := io.Copy(tw, io.LimitReader(payload, size))
	if err != nil {
		return fmt.Errorf("tarwrap: copy payload: %w", err)
	}
	if n != size {
		return fmt.Errorf("%w: payload reader gave %d of %d bytes", ErrShortPayload, n, size)
	}
	return tw.Close()
}

// paxHeaders builds the three blocks overlaybd-commit writes in front of the
// payload. archive/tar cannot express this layout (its writer insists the
// payload header's size equals the bytes that follow, while upstream writes
// size 0 there and lets the PAX record carry the real size) and formats its
// numbers differently, so the blocks are built by hand, field by field as
// upstream's TarFile::write_header_trailer does, to get identical bytes.
func paxHeaders(name string, size int64) []byte {
	buf := make([]byte, 3*BlockSize)
	pax := (*[BlockSize]byte)(buf[:BlockSize])
	rec := paxRecord("size", strconv.FormatInt(size, 10))
	copy(pax[offName:], PAXName)
	octNoNUL(pax[offSize:offSize+lenSize], int64(len(rec)))
	pax[offTypeflag] = typePAX
	copy(pax[offMagic:], magicUSTAR)
	copy(pax[offVersion:], versionUSTAR)
	setChecksum(pax)
	copy(buf[BlockSize:], rec)

	h := (*[BlockSize]byte)(buf[2*BlockSize:])
	copy(h[offName:], name)
	octSpaceNUL(h[offMode:offMode+8], 0o100644) // st_mode of the file upstream creates
	octSpaceNUL(h[offUID:offUID+8], 0)
	octSpaceNUL(h[offGID:offGID+8], 0)
	octNoNUL(h[offSize:offSize+lenSize], 0)
	octNoNUL(h[offMtime:offMtime+12], 0)
	h[offTypeflag] = typeReg
	copy(h[offMagic:], magicUSTAR)
	copy(h[offVersion:], versionUSTAR)
	copy(h[offUname:], "root")
	copy(h[offGname:], "root")
	setChecksum(h)
	return buf
}

// paxRecord formats "<len> key=value\n", len counting itself.
func paxRecord(key, val string) string {
	n := len(key) + len(val) + 3
	n += len(strconv.Itoa(n))
	rec := strconv.Itoa(n) + " " + key + "=" + val + "\n"
	if len(rec) != n { // the length's own digits pushed it over a power of ten
		rec = strconv.Itoa(len(rec)) + " " + key + "=" + val + "\n"
	}
	return rec
}

// octSpaceNUL formats v as upstream's int_to_oct: right-aligned octal in
// len(dst)-2 columns, a space, a NUL.
func octSpaceNUL(dst []byte, v int64) {
	s := fmt.Sprintf("%*o ", len(dst)-2, v)
	copy(dst[:len(dst)-1], s)
	dst[len(dst)-1] = 0
}

// octNoNUL formats v as upstream's int_to_oct_nonull: right-aligned octal in
// len(dst)-1 columns followed by a space instead of a NUL.
func octNoNUL(dst []byte, v int64) {
	s := fmt.Sprintf("%*o", len(dst)-1, v)
	copy(dst[:len(dst)-1], s)
	dst[len(dst)-1] = ' '
}

func setChecksum(h *[BlockSize]byte) {
	sum, _ := checksums(h)
	octSpaceNUL(h[offChksum:offChksum+lenChksum], sum)
}
