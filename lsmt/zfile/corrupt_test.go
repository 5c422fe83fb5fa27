package zfile

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"

	"github.com/obdtrace/obdtrace/internal/crc32c"
)

// withHeader rewrites the header slot of zf through edit, recomputing the
// digest when the flags ask for one.
func withHeader(zf []byte, edit func(*Header)) []byte {
	zf = bytes.Clone(zf)
	var slot [HeaderSize]byte
	copy(slot[:], zf)
	h, err := parseSlot(&slot, "header")
	if err != nil {
		panic(err)
	}
	edit(&h)
	copy(zf, h.marshal()[:])
	return zf
}

// withIndex rewrites the jump table of a seekable-form zf (flags 0x1B)
// through edit and fixes the index CRC and digest so only edit's change counts.
func withIndex(zf []byte, edit func([]uint32)) []byte {
	var slot [HeaderSize]byte
	copy(slot[:], zf)
	h, _ := parseSlot(&slot, "header")
	idx := zf[h.IndexOffset : h.IndexOffset+4*h.IndexSize]
	lens := make([]uint32, h.IndexSize)
	for i := range lens {
		lens[i] = binary.LittleEndian.Uint32(idx[4*i:])
	}
	edit(lens)
	zf = bytes.Clone(zf)
	idx = zf[h.IndexOffset : h.IndexOffset+4*h.IndexSize]
	for i, l := range lens {
		binary.LittleEndian.PutUint32(idx[4*i:], l)
	}
	return withHeader(zf, func(h *Header) { h.IndexCRC = crc32c.Update(0, idx) })
}

// build assembles a ZFile (seekable form) from raw stored block payloads,
// appending a valid CRC to each, so tests can plant bad compressed data.
func build(alg Algorithm, bs int, size uint64, payloads ...[]byte) []byte {
	out := make([]byte, HeaderSize)
	var lens []uint32
	for _, p := range payloads {
		out = append(out, p...)
		out = binary.LittleEndian.AppendUint32(out, crc32c.Update(crc32c.BlockSeed, p))
		lens = append(lens, uint32(len(p)+4))
	}
	h := Header{Flags: 0x1B, BlockSize: uint32(bs), Algorithm: alg, Verify: true,
		IndexOffset: uint64(len(out)), IndexSize: uint64(len(lens)), OriginalSize: size}
	idx := len(out)
	for _, l := range lens {
		out = binary.LittleEndian.AppendUint32(out, l)
	}
	h.IndexCRC = crc32c.Update(0, out[idx:])
	tr := h
	tr.Flags = 0x16
	out = append(out, tr.marshal()[:]...)
	copy(out, h.marshal()[:])
	return out
}

func lz4Block(src []byte) []byte {
	dst := make([]byte, lz4.CompressBlockBound(len(src)))
	n, _ := new(lz4.CompressorCCompat).CompressBlock(src, dst)
	return dst[:n]
}

func zstdFrame(src []byte) []byte {
	enc, _ := zstd.NewWriter(nil)
	defer enc.Close()
	return enc.EncodeAll(src, nil)
}

func openErr(zf []byte) error {
	z, err := NewReader(bytes.NewReader(zf), int64(len(zf)))
	if err == nil {
		z.Close()
	}
	return err
}

func TestBadHeaders(t *testing.T) {
	good := compress(t, genData(10, 30_000), Options{})
	streamed := func() []byte {
		var b bytes.Buffer
		zw, _ := NewWriter(&b, Options{})
		zw.Write(genData(10, 30_000))
		zw.Close()
		return b.Bytes()
	}()
	flip := func(b []byte, i int) []byte { b = bytes.Clone(b); b[i] ^= 0x40; return b }
	cases := []struct {
		name string
		zf   []byte
		want error
	}{
		{"empty", nil, ErrNotZFile},
		{"wrong magic0", flip(good, 2), ErrNotZFile},
		{"wrong magic1", flip(good, 12), ErrNotZFile},
		{"header only", good[:HeaderSize], ErrTruncated},
		{"truncated seekable form", good[:len(good)-700], ErrCorrupt},
		{"truncated streamed form", streamed[:len(streamed)-100], ErrNotZFile},
		{"bad digest", flip(good, 200), ErrChecksum},
		{"bad trailer digest", flip(streamed, len(streamed)-10), ErrChecksum},
		{"bad struct size", func() []byte {
			b := bytes.Clone(good)
			binary.LittleEndian.PutUint32(b[24:], 97)
			return b
		}(), ErrCorrupt},
		{"no header bit", withHeader(good, func(h *Header) { h.Flags &^= FlagHeader }), ErrCorrupt},
		{"no data bit, no overwrite", withHeader(streamed, func(h *Header) { h.Flags &^= FlagDataFile }), ErrCorrupt},
		{"trailer not sealed", func() []byte {
			b := bytes.Clone(streamed)
			binary.LittleEndian.PutUint64(b[len(b)-HeaderSize+32:], uint64(FlagDataFile|FlagDigest))
			return b
		}(), ErrCorrupt},
		{"unknown algorithm", withHeader(good, func(h *Header) { h.Algorithm = 3 }), ErrUnsupported},
		{"minilzo", withHeader(good, func(h *Header) { h.Algorithm = MiniLZO }), ErrUnsupported},
		{"dictionary", withHeader(good, func(h *Header) { h.UseDict = true }), ErrUnsupported},
		{"block size not a power of two", withHeader(good, func(h *Header) { h.BlockSize = 5000 }), ErrCorrupt},
		{"block size 128K", withHeader(good, func(h *Header) { h.BlockSize = 128 << 10 }), ErrUnsupported},
		{"block size 0", withHeader(good, func(h *Header) { h.BlockSize = 0 }), ErrCorrupt},
		{"index size above 1e9", withHeader(good, func(h *Header) { h.IndexSize = 2_000_000_000 }), ErrCorrupt},
		{"index past the trailer", withHeader(good, func(h *Header) { h.IndexSize += 200 }), ErrCorrupt},
		{"index offset past the trailer", withHeader(good, func(h *Header) { h.IndexOffset = 1 << 40 }), ErrCorrupt},
		{"index offset inside the header", withHeader(good, func(h *Header) { h.IndexOffset = 100 }), ErrCorrupt},
		{"original size disagrees", withHeader(good, func(h *Header) { h.OriginalSize += 1 << 20 }), ErrCorrupt},
		{"bad index crc", withHeader(good, func(h *Header) { h.IndexCRC++ }), ErrChecksum},
		{"swapped index entries", func() []byte {
			// Swap without fixing the CRC: lengths stay plausible, the CRC catches it.
			var slot [HeaderSize]byte
			copy(slot[:], good)
			h, _ := parseSlot(&slot, "header")
			b := bytes.Clone(good)
			i := h.IndexOffset
			for k := range uint64(4) {
				b[i+k], b[i+4+k] = b[i+4+k], b[i+k]
			}
			if bytes.Equal(b, good) {
				panic("blocks 0 and 1 have equal lengths; pick other data")
			}
			return b
		}(), ErrChecksum},
		{"zero-length stored block", withIndex(good, func(l []uint32) { l[2] = 0 }), ErrCorrupt},
		{"stored block of only a CRC", withIndex(good, func(l []uint32) { l[2] = 4 }), ErrCorrupt},
		{"huge stored block", withIndex(good, func(l []uint32) { l[0] = 1 << 31 }), ErrCorrupt},
		{"blocks overlap the index", withIndex(good, func(l []uint32) { l[0] += 2000 }), ErrCorrupt},
	}
	for _, c := range cases {
		err := openErr(c.zf)
		if !errors.Is(err, c.want) {
			t.Errorf("%s: NewReader err = %v, want %v", c.name, err, c.want)
		}
	}
}

func TestBadBlocks(t *testing.T) {
	data := genData(11, 10*4096+77)
	good := compress(t, data, Options{})
	z := open(t, good)
	// Flip a byte inside block 3's compressed payload.
	b := bytes.Clone(good)
	b[z.jump[3]+5] ^= 1
	zb := open(t, b)
	buf := make([]byte, len(data))
	n, err := zb.ReadAt(buf, 0)
	if !errors.Is(err, ErrChecksum) || !strings.Contains(err.Error(), "block 3 ") {
		t.Fatalf("flipped byte: err = %v, want ErrChecksum naming block 3", err)
	}
	if n != 0 { // blocks 0..3 come from one span, checked before anything is returned
		t.Logf("returned %d good bytes before the bad block", n)
	}
	if !bytes.Equal(buf[:n], data[:n]) {
		t.Fatal("bytes before the bad block are wrong")
	}
	// Reads that avoid block 3 still work.
	if _, err := zb.ReadAt(buf[:4096], 5*4096); err != nil {
		t.Fatalf("read of a good block: %v", err)
	}
	// A truncated underlying reader surfaces as ErrTruncated, not a panic.
	short := &rangesReaderAt{b: good, ok: [][2]int64{{0, HeaderSize}, {int64(z.Header().IndexOffset), int64(len(good))}}}
	zs, err := NewReader(short, int64(len(good)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := zs.ReadAt(buf[:10], 0); err == nil {
		t.Fatal("failed underlying read not reported")
	}
	zt, err := NewReader(&truncReaderAt{good, z.jump[5], z.Header().IndexOffset}, int64(len(good)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err = zt.ReadAt(buf, 0); !errors.Is(err, ErrTruncated) {
		t.Fatalf("short underlying read: err = %v, want ErrTruncated", err)
	}
}

// truncReaderAt hides the bytes of b from cut up to meta (where the jump
// table starts), like a blob cache missing a range.
type truncReaderAt struct {
	b         []byte
	cut, meta uint64
}

func (r *truncReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if uint64(off) >= r.meta || uint64(off)+uint64(len(p)) <= r.cut {
		return copy(p, r.b[off:]), nil
	}
	if uint64(off) >= r.cut {
		return 0, io.EOF
	}
	return copy(p, r.b[off:r.cut]), io.EOF
}

func TestBadCompressedData(t *testing.T) {
	full := bytes.Repeat([]byte("abcdefgh"), 512) // one 4 KiB block
	cases := []struct {
		name string
		zf   []byte
	}{
		{"lz4 garbage", build(LZ4, 4096, 4096, []byte{0xff, 0xff, 0xff, 0xff, 0x00, 0x01})},
		{"lz4 short block", build(LZ4, 4096, 4096, lz4Block(full[:100]))},
		{"lz4 long last block", build(LZ4, 4096, 100, lz4Block(full))},
		{"zstd garbage", build(ZSTD, 4096, 4096, []byte("definitely not zstd"))},
		{"zstd short block", build(ZSTD, 4096, 4096, zstdFrame(full[:100]))},
		{"zstd oversized frame", build(ZSTD, 4096, 4096, zstdFrame(append(full, full...)))},
		{"zstd long last block", build(ZSTD, 4096, 100, zstdFrame(full))},
	}
	for _, c := range cases {
		z, err := NewReader(bytes.NewReader(c.zf), int64(len(c.zf)))
		if err != nil {
			t.Fatalf("%s: NewReader: %v", c.name, err)
		}
		if _, err := z.ReadAt(make([]byte, z.Size()), 0); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: ReadAt err = %v, want ErrCorrupt", c.name, err)
		}
		// Partial reads go through the scratch path: same verdict.
		if _, err := z.ReadAt(make([]byte, 10), 1); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: partial ReadAt err = %v, want ErrCorrupt", c.name, err)
		}
		z.Close()
	}
	// The builder itself produces readable files.
	for _, alg := range []Algorithm{LZ4, ZSTD} {
		enc := lz4Block(full)
		if alg == ZSTD {
			enc = zstdFrame(full)
		}
		zf := build(alg, 4096, 4096, enc)
		z := open(t, zf)
		if !bytes.Equal(readAll(t, z), full) {
			t.Fatalf("%v: builder output unreadable", alg)
		}
	}
}

// fuzzSentinels are the errors a bad file may produce.
var fuzzSentinels = []error{ErrNotZFile, ErrCorrupt, ErrChecksum, ErrUnsupported, ErrTruncated}

func isSentinel(err error) bool {
	for _, s := range fuzzSentinels {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

func FuzzReader(f *testing.F) {
	small := genData(12, 3*4096+123)
	for _, o := range []Options{{}, {Algorithm: ZSTD}, {NoVerify: true}, {Algorithm: ZSTD, BlockSize: 8192, NoVerify: true}} {
		f.Add(compress(f, small, o))
	}
	var streamed bytes.Buffer
	zw, _ := NewWriter(&streamed, Options{})
	zw.Write(small[:5000])
	zw.Close()
	f.Add(streamed.Bytes())
	f.Add(build(LZ4, 4096, 4096, []byte{0x10, 'a'}))
	f.Add([]byte("ZFile\x00\x01\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		z, err := NewReader(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			if !isSentinel(err) {
				t.Fatalf("NewReader error wraps no sentinel: %v", err)
			}
			return
		}
		defer z.Close()
		buf := make([]byte, 5000) // not a block multiple: exercises partial blocks
		for off := int64(0); off < min(z.Size(), 16<<20); off += int64(len(buf)) {
			n, err := z.ReadAt(buf, off)
			if err == io.EOF {
				break
			}
			if err != nil {
				if !isSentinel(err) {
					t.Fatalf("ReadAt error wraps no sentinel: %v", err)
				}
				return
			}
			if n != len(buf) {
				t.Fatalf("short read %d without error", n)
			}
			if s, e, err := z.CompressedRange(off, int64(len(buf))); err != nil || s > e || e > int64(len(b)) {
				t.Fatalf("CompressedRange = [%d,%d) %v in a %d-byte file", s, e, err, len(b))
			}
		}
	})
}
