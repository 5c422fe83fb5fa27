package zfile

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"testing"
)

// genData returns n bytes resembling a filesystem image: text, structured
// binary, zero runs and some incompressible stretches.
func genData(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, 99))
	words := []string{"the ", "container ", "image ", "layer ", "overlaybd ", "block ", "read ",
		"func ", "return ", "if err != nil {\n", "\t", "import ", "package ", "0x", "ELF", "lib",
		"/usr/lib/x86_64-linux-gnu/", ".so.6", "python3", "__init__", "error: ", "=", "\n"}
	out := make([]byte, 0, n)
	for len(out) < n {
		chunk := 512 + rng.IntN(16<<10)
		switch k := rng.IntN(10); {
		case k < 4: // text
			for end := len(out) + chunk; len(out) < end; {
				out = append(out, words[rng.IntN(len(words))]...)
			}
		case k < 7: // structured binary: small little-endian records
			for range chunk / 16 {
				out = binary.LittleEndian.AppendUint64(out, uint64(rng.IntN(4096)))
				out = binary.LittleEndian.AppendUint32(out, uint32(len(out)))
				out = binary.LittleEndian.AppendUint32(out, 0)
			}
		case k < 9: // zeros
			out = append(out, make([]byte, chunk)...)
		default: // incompressible
			for range chunk {
				out = append(out, byte(rng.Uint32()))
			}
		}
	}
	return out[:n]
}

// compress writes data as a ZFile with opts into a seekable memFile.
func compress(t testing.TB, data []byte, opts Options) []byte {
	t.Helper()
	var out memFile
	zw, err := NewWriter(&out, opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := zw.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return out.b
}

func open(t testing.TB, zf []byte) *Reader {
	t.Helper()
	z, err := NewReader(bytes.NewReader(zf), int64(len(zf)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { z.Close() })
	return z
}

func TestRoundTrip(t *testing.T) {
	for _, alg := range []Algorithm{LZ4, ZSTD} {
		for _, bs := range []int{4 << 10, 8 << 10, 16 << 10, 64 << 10} {
			size := 40*bs + 1234 // not a multiple of the block size
			t.Run(fmt.Sprintf("%v/%dK", alg, bs>>10), func(t *testing.T) {
				data := genData(uint64(bs), size)
				zf := compress(t, data, Options{Algorithm: alg, BlockSize: bs})
				z := open(t, zf)
				h := z.Header()
				if h.Flags != 0x1B || h.Algorithm != alg || int(h.BlockSize) != bs || !h.Verify {
					t.Fatalf("header %+v", h)
				}
				if z.Size() != int64(size) || z.NumBlocks() != 41 {
					t.Fatalf("Size %d NumBlocks %d", z.Size(), z.NumBlocks())
				}
				if got := readAll(t, z); !bytes.Equal(got, data) {
					t.Fatal("round trip changed the data")
				}
				checkRandomReads(t, z, 0, data, 100)
				checkCompressedRanges(t, z, zf)
			})
		}
	}
}

// checkCompressedRanges checks CompressedRange against the jump table and
// that the range it names holds exactly the covering blocks.
func checkCompressedRanges(t *testing.T, z *Reader, zf []byte) {
	t.Helper()
	bs := int64(z.BlockSize())
	start, end, err := z.CompressedRange(0, z.Size())
	if err != nil || start != HeaderSize || end != int64(z.Header().IndexOffset) {
		t.Fatalf("CompressedRange(all) = [%d,%d) %v; want [512,%d)", start, end, err, z.Header().IndexOffset)
	}
	start, end, _ = z.CompressedRange(bs+1, bs) // touches blocks 1 and 2
	if start != int64(z.jump[1]) || end != int64(z.jump[3]) {
		t.Fatalf("CompressedRange(bs+1, bs) = [%d,%d), want [%d,%d)", start, end, z.jump[1], z.jump[3])
	}
	// Reading blocks 1 and 2 must need nothing outside that range besides
	// the metadata NewReader reads.
	meta := int64(z.Header().IndexOffset)
	zs, err := NewReader(&rangesReaderAt{b: zf, ok: [][2]int64{{0, HeaderSize}, {meta, int64(len(zf))}, {start, end}}},
		int64(len(zf)))
	if err != nil {
		t.Fatal(err)
	}
	defer zs.Close()
	if _, err := zs.ReadAt(make([]byte, bs), bs+1); err != nil {
		t.Fatalf("blocks named by CompressedRange are not sufficient: %v", err)
	}
	if s2, e2, err := z.CompressedRange(5, 0); err != nil || s2 != e2 {
		t.Fatalf("empty CompressedRange = [%d,%d) %v", s2, e2, err)
	}
	if _, _, err := z.CompressedRange(z.Size(), 1); !errors.Is(err, io.EOF) {
		t.Fatalf("CompressedRange at Size: %v, want io.EOF", err)
	}
	if _, _, err := z.CompressedRange(-1, 1); err == nil {
		t.Fatal("negative CompressedRange accepted")
	}
	if s, e, _ := z.CompressedRange(z.Size()-1, 1<<40); e != int64(z.jump[z.NumBlocks()]) || s != int64(z.jump[z.NumBlocks()-1]) {
		t.Fatalf("CompressedRange past the end not clamped: [%d,%d)", s, e)
	}
}

// rangesReaderAt serves reads of b that fall inside one of the ok ranges.
type rangesReaderAt struct {
	b  []byte
	ok [][2]int64
}

func (r *rangesReaderAt) ReadAt(p []byte, off int64) (int, error) {
	for _, rg := range r.ok {
		if off >= rg[0] && off+int64(len(p)) <= rg[1] {
			return copy(p, r.b[off:]), nil
		}
	}
	return 0, fmt.Errorf("read [%d,+%d) outside the allowed ranges", off, len(p))
}

// Split writes must produce the same file as one write.
func TestWriteChunking(t *testing.T) {
	data := genData(3, 100_000)
	want := compress(t, data, Options{})
	for _, step := range []int{1, 7, 4095, 4096, 4097, 65536} {
		var out memFile
		zw, err := NewWriter(&out, Options{})
		if err != nil {
			t.Fatal(err)
		}
		for p := data; len(p) > 0; {
			n := min(step, len(p))
			if k, err := zw.Write(p[:n]); k != n || err != nil {
				t.Fatalf("step %d: Write = %d, %v", step, k, err)
			}
			p = p[n:]
		}
		if err := zw.Close(); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out.b, want) {
			t.Fatalf("step %d: output differs from a single write", step)
		}
	}
}

// Without a seekable writer the header keeps flags 0x13 and readers use the
// trailer; both forms carry the same data.
func TestNonSeekableWriter(t *testing.T) {
	data := genData(4, 50_000)
	var buf bytes.Buffer
	zw, err := NewWriter(&buf, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := zw.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	z := open(t, buf.Bytes())
	if h := z.Header(); h.Flags != 0x13 || h.IndexSize != 0 || h.OriginalSize != 0 {
		t.Fatalf("streamed header = %+v; want flags 0x13 and no layout", h)
	}
	tr, ok := z.Trailer()
	if !ok || tr.Flags != 0x16 {
		t.Fatalf("trailer ok=%v flags %#x, want 0x16", ok, uint64(tr.Flags))
	}
	if !bytes.Equal(readAll(t, z), data) {
		t.Fatal("data differs")
	}
	// Same bytes as the seekable form apart from the header slot.
	seek := compress(t, data, Options{})
	if !bytes.Equal(seek[HeaderSize:], buf.Bytes()[HeaderSize:]) {
		t.Fatal("streamed and seekable forms differ beyond the header")
	}
}

// A Writer that starts mid-file (after a tar header, say) rewrites its own
// header, not the file's first bytes.
func TestWriterAtOffset(t *testing.T) {
	data := genData(5, 30_000)
	prefix := bytes.Repeat([]byte{0xAB}, 1536)
	for _, name := range []string{"writerat", "seeker"} {
		var f memFile
		f.Write(prefix)
		var w io.Writer = &f
		if name == "seeker" {
			w = struct {
				io.Writer
				io.Seeker
			}{&f, &f}
		}
		zw, err := NewWriter(w, Options{})
		if err != nil {
			t.Fatal(err)
		}
		zw.Write(data)
		if err := zw.Close(); err != nil {
			t.Fatal(err)
		}
		f.Write([]byte("tail")) // the position must be back at the end
		if !bytes.Equal(f.b[:1536], prefix) || !bytes.HasSuffix(f.b, []byte("tail")) {
			t.Fatalf("%s: bytes outside the ZFile were touched", name)
		}
		zf := f.b[1536 : len(f.b)-4]
		z := open(t, zf)
		if z.Header().Flags != 0x1B || !bytes.Equal(readAll(t, z), data) {
			t.Fatalf("%s: header flags %#x or data wrong", name, uint64(z.Header().Flags))
		}
	}
}

func TestWriterOptions(t *testing.T) {
	data := genData(6, 20_000)
	zf := compress(t, data, Options{Algorithm: ZSTD, Level: 19, NoVerify: true, BlockSize: 8192})
	z := open(t, zf)
	if h := z.Header(); h.Verify || h.Algorithm != ZSTD || h.Level != 0 || h.BlockSize != 8192 {
		t.Fatalf("header %+v", h)
	}
	if !bytes.Equal(readAll(t, z), data) {
		t.Fatal("data differs")
	}
	for _, o := range []Options{{BlockSize: 1000}, {BlockSize: 2048}, {BlockSize: 128 << 10},
		{BlockSize: -4096}, {Algorithm: 7}} {
		if _, err := NewWriter(io.Discard, o); err == nil {
			t.Errorf("options %+v accepted", o)
		}
	}
	zw, _ := NewWriter(io.Discard, Options{})
	zw.Close()
	if _, err := zw.Write([]byte{1}); err == nil {
		t.Fatal("write after close accepted")
	}
}

func TestEmptyAndIncompressible(t *testing.T) {
	z := open(t, compress(t, nil, Options{}))
	if z.Size() != 0 || z.NumBlocks() != 0 {
		t.Fatalf("empty: Size %d NumBlocks %d", z.Size(), z.NumBlocks())
	}
	if n, err := z.ReadAt(make([]byte, 10), 0); n != 0 || err != io.EOF {
		t.Fatalf("empty ReadAt = %d, %v", n, err)
	}
	rnd := make([]byte, 3*4096+5)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range rnd {
		rnd[i] = byte(r.Uint32())
	}
	for _, alg := range []Algorithm{LZ4, ZSTD} {
		z := open(t, compress(t, rnd, Options{Algorithm: alg}))
		// Upstream stores incompressible blocks compressed anyway, so they
		// grow; there is no raw-block escape to honour.
		if s, e, _ := z.CompressedRange(0, 4096); e-s <= 4096 {
			t.Fatalf("%v: incompressible block stored in %d bytes", alg, e-s)
		}
		if !bytes.Equal(readAll(t, z), rnd) {
			t.Fatalf("%v: incompressible data differs", alg)
		}
	}
}

// failWriter fails after n bytes.
type failWriter struct{ n int }

func (f *failWriter) Write(p []byte) (int, error) {
	if len(p) > f.n {
		k := f.n
		f.n = 0
		return k, errors.New("disk full")
	}
	f.n -= len(p)
	return len(p), nil
}

func TestWriterErrors(t *testing.T) {
	if _, err := NewWriter(&failWriter{n: 10}, Options{}); err == nil {
		t.Fatal("header write failure ignored")
	}
	zw, err := NewWriter(&failWriter{n: 600}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	zw.Write(genData(7, 1<<20))
	if err := zw.Close(); err == nil {
		t.Fatal("write failure not reported by Close")
	}
	if _, err := zw.Write([]byte{1}); err == nil {
		t.Fatal("write after failure accepted")
	}
}

func TestConcurrentReads(t *testing.T) {
	data := genData(8, 2<<20)
	for _, alg := range []Algorithm{LZ4, ZSTD} {
		z := open(t, compress(t, data, Options{Algorithm: alg}))
		errs := make(chan error, 4)
		for g := range 4 {
			go func() {
				rng := rand.New(rand.NewPCG(uint64(g), 1))
				buf := make([]byte, 70_000)
				for range 200 {
					off := rng.Int64N(int64(len(data)))
					n, _ := z.ReadAt(buf, off)
					if !bytes.Equal(buf[:n], data[off:off+int64(n)]) {
						errs <- fmt.Errorf("%v: wrong bytes at %d", alg, off)
						return
					}
				}
				errs <- nil
			}()
		}
		for range 4 {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
	}
}

func TestIsZFile(t *testing.T) {
	zf := compress(t, []byte("hello"), Options{})
	if ok, err := IsZFile(bytes.NewReader(zf), int64(len(zf))); !ok || err != nil {
		t.Fatalf("IsZFile(zfile) = %v, %v", ok, err)
	}
	junk := make([]byte, 1024)
	if ok, err := IsZFile(bytes.NewReader(junk), 1024); ok || err != nil {
		t.Fatalf("IsZFile(zeros) = %v, %v", ok, err)
	}
	if ok, _ := IsZFile(bytes.NewReader(zf[:100]), 100); ok {
		t.Fatal("IsZFile(short) = true")
	}
}

// Large reads are served in several spans of at most maxSpan compressed
// bytes; each span is one ReadAt on the underlying reader.
func TestReadSpans(t *testing.T) {
	rnd := make([]byte, 10<<20) // incompressible: ~10 MiB compressed
	r := rand.New(rand.NewPCG(3, 4))
	for i := range rnd {
		rnd[i] = byte(r.Uint32())
	}
	zf := compress(t, rnd, Options{})
	cr := &countingReaderAt{r: bytes.NewReader(zf)}
	z, err := NewReader(cr, int64(len(zf)))
	if err != nil {
		t.Fatal(err)
	}
	cr.calls = 0
	got := make([]byte, len(rnd))
	if _, err := z.ReadAt(got, 0); err != nil || !bytes.Equal(got, rnd) {
		t.Fatalf("large read: %v", err)
	}
	if cr.calls != 3 || cr.maxLen > maxSpan {
		t.Fatalf("large read used %d ReadAt calls (max %d bytes), want 3 of <= %d", cr.calls, cr.maxLen, maxSpan)
	}
	cr.calls = 0
	if _, err := z.ReadAt(got[:64<<10], 5000); err != nil || cr.calls != 1 {
		t.Fatalf("64 KiB read used %d ReadAt calls, want 1 (%v)", cr.calls, err)
	}
}

type countingReaderAt struct {
	r      io.ReaderAt
	calls  int
	maxLen int
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	c.calls++
	c.maxLen = max(c.maxLen, len(p))
	return c.r.ReadAt(p, off)
}
