package zfile

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/obdtrace/obdtrace/lsmt/tarwrap"
)

var (
	testdataDir = filepath.Join("..", "..", "..", "shared", "testdata", "overlaybd")
	helloLayer  = filepath.Join(testdataDir, "aci-hello-world-oci", "blobs", "sha256",
		"022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d")
	lsmtMagic = []byte{0x4C, 0x53, 0x4D, 0x54, 0x00, 0x01, 0x02, 0x00}
)

// helloZFile returns the ZFile inside the real hello-world layer blob.
func helloZFile(t testing.TB) []byte {
	t.Helper()
	blob, err := os.ReadFile(helloLayer)
	if err != nil {
		t.Fatalf("real test blob missing (tests read ../shared beside the checkout): %v", err)
	}
	sr, wrapped, err := tarwrap.NewReader(bytes.NewReader(blob), int64(len(blob)))
	if err != nil || !wrapped {
		t.Fatalf("tar wrapper: wrapped=%v err=%v", wrapped, err)
	}
	zf := make([]byte, sr.Size())
	if _, err := sr.ReadAt(zf, 0); err != nil {
		t.Fatal(err)
	}
	return zf
}

// baselayer extracts ext4_64 from the gzip tar into a temp dir and opens it.
func baselayer(t testing.TB) (*os.File, int64) {
	t.Helper()
	gz, err := os.Open(filepath.Join(testdataDir, "ext4_64.tar.gz"))
	if err != nil {
		t.Fatalf("real test blob missing: %v", err)
	}
	defer gz.Close()
	zr, err := gzip.NewReader(gz)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	for {
		h, err := tr.Next()
		if err != nil {
			t.Fatalf("ext4_64 not found in the archive: %v", err)
		}
		if h.Name != "ext4_64" {
			continue
		}
		path := filepath.Join(t.TempDir(), "ext4_64")
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		if _, err := io.Copy(f, io.LimitReader(tr, 64<<20)); err != nil {
			t.Fatal(err)
		}
		return f, h.Size
	}
}

func readAll(t testing.TB, z *Reader) []byte {
	t.Helper()
	out := make([]byte, z.Size())
	if n, err := z.ReadAt(out, 0); n != len(out) || (err != nil && err != io.EOF) {
		t.Fatalf("ReadAt all: %d of %d bytes, %v", n, len(out), err)
	}
	return out
}

// checkLSMTPayload asserts the decompressed bytes look like a committed
// LSMT layer: its header at 0 and its trailer in the last 4096 bytes.
func checkLSMTPayload(t *testing.T, data []byte) {
	t.Helper()
	if !bytes.HasPrefix(data, lsmtMagic) {
		t.Fatalf("payload starts % x, want the LSMT magic", data[:8])
	}
	if len(data) < 8192 || !bytes.HasPrefix(data[len(data)-4096:], lsmtMagic) {
		t.Fatal("no LSMT trailer in the last 4096 bytes")
	}
}

func TestRealHelloWorld(t *testing.T) {
	zf := helloZFile(t)
	z, err := NewReader(bytes.NewReader(zf), int64(len(zf)))
	if err != nil {
		t.Fatal(err)
	}
	defer z.Close()
	h := z.Header()
	if h.Flags != 0x1B || h.Algorithm != LZ4 || h.BlockSize != 4096 || !h.Verify || h.Level != 0 {
		t.Fatalf("header = %+v; want flags 0x1B, LZ4, 4096, verify", h)
	}
	if h.IndexSize != 17463 || h.OriginalSize != 71528448 || h.IndexOffset != 0x8af27 {
		t.Fatalf("header layout = %d blocks, %d bytes, index at %#x", h.IndexSize, h.OriginalSize, h.IndexOffset)
	}
	if _, ok := z.Trailer(); ok {
		t.Fatal("trailer read although the header carries its fields")
	}
	var slot [HeaderSize]byte
	copy(slot[:], zf[len(zf)-HeaderSize:])
	tr, err := parseSlot(&slot, "trailer")
	if err != nil || tr.Flags != 0x16 || checkDigest(&slot, tr, "trailer") != nil {
		t.Fatalf("upstream trailer flags %#x err %v; want 0x16 with a valid digest", uint64(tr.Flags), err)
	}
	if z.Size() != 71528448 || z.NumBlocks() != 17463 || z.BlockSize() != 4096 {
		t.Fatalf("Size %d NumBlocks %d BlockSize %d", z.Size(), z.NumBlocks(), z.BlockSize())
	}
	data := readAll(t, z)
	checkLSMTPayload(t, data)
	const wantSum = "39195424aa10572fe002262190877b4306a66be9c62c8f1594141b01dc79c2ea"
	if got := sha256.Sum256(data); hex.EncodeToString(got[:]) != wantSum {
		t.Fatalf("uncompressed sha256 %x, want %s", got, wantSum)
	}
	checkRandomReads(t, z, 0, data, 300)
}

func TestRealBaselayer(t *testing.T) {
	f, size := baselayer(t)
	z, err := NewReader(f, size)
	if err != nil {
		t.Fatal(err)
	}
	defer z.Close()
	h := z.Header()
	if h.Flags.Has(FlagHeaderOverwrite) || h.Flags.Has(FlagDigest) || !h.Flags.Has(FlagHeader|FlagDataFile) {
		t.Fatalf("baselayer header flags %#x; want the old form (header, data, no overwrite, no digest)", uint64(h.Flags))
	}
	tr, ok := z.Trailer()
	if !ok || tr.Flags.Has(FlagHeader) || !tr.Flags.Has(FlagSealed) {
		t.Fatalf("trailer not used: ok=%v flags %#x", ok, uint64(tr.Flags))
	}
	if z.Size() != 0x204d5000 || z.NumBlocks() != 0x204d5 || z.Algorithm() != LZ4 {
		t.Fatalf("Size %#x NumBlocks %#x alg %v", z.Size(), z.NumBlocks(), z.Algorithm())
	}
	// The uncompressed layer is 517 MiB: stream it through a hash and keep
	// only its two ends for the random reads.
	const window = 16 << 20
	sum := sha256.New()
	buf := make([]byte, 4<<20)
	var head, tail []byte
	for off := int64(0); off < z.Size(); off += int64(len(buf)) {
		n, err := z.ReadAt(buf, off)
		if err != nil && err != io.EOF {
			t.Fatalf("ReadAt at %d: %v", off, err)
		}
		sum.Write(buf[:n])
		if off < window {
			head = append(head, buf[:n]...)
		}
		if off >= z.Size()-window {
			tail = append(tail, buf[:n]...)
		}
	}
	// Pinned from this reader; the LSMT magic at both ends, every block's
	// CRC and exact decompressed lengths corroborate it.
	const wantSum = "799dbd74cbcfbd7f37611057130b20fda0e1e671280df97cc3a05d73620d5ac7"
	if got := hex.EncodeToString(sum.Sum(nil)); got != wantSum {
		t.Fatalf("uncompressed sha256 %s, want %s", got, wantSum)
	}
	if !bytes.HasPrefix(head, lsmtMagic) || !bytes.HasPrefix(tail[len(tail)-4096:], lsmtMagic) {
		t.Fatal("uncompressed layer lacks the LSMT header or trailer magic")
	}
	checkRandomReads(t, z, 0, head, 150)
	checkRandomReads(t, z, z.Size()-int64(len(tail)), tail, 150)
}

// checkRandomReads compares reads at random offsets and lengths inside the
// window [base, base+len(want)) with the expected bytes; when the window
// ends at Size, reads also cross the end and must report io.EOF.
func checkRandomReads(t *testing.T, z *Reader, base int64, want []byte, n int) {
	t.Helper()
	rng := rand.New(rand.NewPCG(uint64(len(want)), 7))
	end := base + int64(len(want))
	atEOF := end == z.Size()
	buf := make([]byte, 300<<10)
	for i := range n {
		off := base + rng.Int64N(int64(len(want))+1)
		switch i % 4 {
		case 0: // block aligned
			off = max(off&^int64(z.BlockSize()-1), base)
		case 1: // near the end of the window
			off = max(end-int64(rng.IntN(3*z.BlockSize())), base)
		}
		ln := rng.IntN(len(buf) + 1)
		if !atEOF {
			ln = int(min(int64(ln), end-off))
		}
		got, err := z.ReadAt(buf[:ln], off)
		wantN := int(min(int64(ln), end-off))
		if got != wantN {
			t.Fatalf("ReadAt(%d bytes at %d) = %d, want %d (%v)", ln, off, got, wantN, err)
		}
		if wantEOF := int64(ln) > end-off; wantEOF != (err == io.EOF) || (!wantEOF && err != nil) {
			t.Fatalf("ReadAt(%d bytes at %d) err = %v, want EOF=%v", ln, off, err, wantEOF)
		}
		if !bytes.Equal(buf[:got], want[off-base:off-base+int64(got)]) {
			t.Fatalf("ReadAt(%d bytes at %d) returned wrong bytes", ln, off)
		}
	}
	if _, err := z.ReadAt(buf[:1], -1); err == nil {
		t.Fatal("negative offset accepted")
	}
}

// memFile is an in-memory io.Writer, io.WriterAt and io.Seeker, like a file.
type memFile struct {
	b   []byte
	pos int64
}

func (m *memFile) Write(p []byte) (int, error) {
	n, err := m.WriteAt(p, m.pos)
	m.pos += int64(n)
	return n, err
}

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	if need := off + int64(len(p)); need > int64(len(m.b)) {
		m.b = append(m.b, make([]byte, need-int64(len(m.b)))...)
	}
	return copy(m.b[off:], p), nil
}

func (m *memFile) Seek(off int64, whence int) (int64, error) {
	switch whence {
	case io.SeekCurrent:
		off += m.pos
	case io.SeekEnd:
		off += int64(len(m.b))
	}
	if off < 0 {
		return 0, errors.New("negative position")
	}
	m.pos = off
	return off, nil
}

// TestRecompressMatchesUpstream re-compresses the real layer with the
// default options (upstream's converter settings) and compares bytes.
func TestRecompressMatchesUpstream(t *testing.T) {
	zf := helloZFile(t)
	z, err := NewReader(bytes.NewReader(zf), int64(len(zf)))
	if err != nil {
		t.Fatal(err)
	}
	data := readAll(t, z)
	var out memFile
	zw, err := NewWriter(&out, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := zw.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(out.b, zf) {
		return // byte for byte identical, digests and index included
	}
	for i := range min(len(out.b), len(zf)) {
		if out.b[i] != zf[i] {
			t.Fatalf("re-compressed ZFile differs from upstream's at byte %d (sizes %d vs %d)", i, len(out.b), len(zf))
		}
	}
	t.Fatalf("re-compressed ZFile is %d bytes, upstream's %d", len(out.b), len(zf))
}

func TestParseAlgorithm(t *testing.T) {
	for name, want := range map[string]Algorithm{"lz4": LZ4, "zstd": ZSTD, "ZSTD": ZSTD, "Lz4": LZ4} {
		got, err := ParseAlgorithm(name)
		if err != nil || got != want {
			t.Errorf("ParseAlgorithm(%q) = %v, %v; want %v", name, got, err, want)
		}
		if got.String() != strings.ToLower(name) {
			t.Errorf("ParseAlgorithm(%q).String() = %q: does not round-trip", name, got)
		}
	}
	for _, name := range []string{"", "minilzo", "gzip", "lz4 ", "zstd:3"} {
		if a, err := ParseAlgorithm(name); !errors.Is(err, ErrUnsupported) {
			t.Errorf("ParseAlgorithm(%q) = %v, %v; want ErrUnsupported", name, a, err)
		}
	}
}
