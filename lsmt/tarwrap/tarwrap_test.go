package tarwrap

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// helloLayer is the upstream-converted hello-world layer: PAX wrapper around
// a ZFile.
var helloLayer = filepath.Join("..", "..", "..", "shared", "testdata", "overlaybd",
	"aci-hello-world-oci", "blobs", "sha256",
	"022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d")

func readHello(t testing.TB) []byte {
	t.Helper()
	b, err := os.ReadFile(helloLayer)
	if err != nil {
		t.Fatalf("real test blob missing (tests read ../shared beside the checkout): %v", err)
	}
	return b
}

func detectBytes(b []byte) (int64, int64, bool, error) {
	return Detect(bytes.NewReader(b), int64(len(b)))
}

func TestDetectRealLayer(t *testing.T) {
	blob := readHello(t)
	off, n, ok, err := detectBytes(blob)
	if err != nil || !ok {
		t.Fatalf("Detect = ok %v, err %v; want a wrapper", ok, err)
	}
	if off != 1536 || n != 639491 {
		t.Fatalf("payload at %d size %d, want 1536 size 639491", off, n)
	}
	if got := string(blob[off : off+6]); got != "ZFile\x00" {
		t.Fatalf("payload starts %q, want the ZFile magic", got)
	}
	sr, wrapped, err := NewReader(bytes.NewReader(blob), int64(len(blob)))
	if err != nil || !wrapped || sr.Size() != 639491 {
		t.Fatalf("NewReader = size %v wrapped %v err %v", sr.Size(), wrapped, err)
	}
}

// Writing the real payload in the PAX form must reproduce upstream's blob
// byte for byte: headers, padding and end-of-archive blocks.
func TestWritePAXMatchesUpstream(t *testing.T) {
	blob := readHello(t)
	payload := blob[1536 : 1536+639491]
	var out bytes.Buffer
	if err := Write(&out, CommitName, bytes.NewReader(payload), int64(len(payload))); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), blob) {
		got := out.Bytes()
		for i := range min(len(got), len(blob)) {
			if got[i] != blob[i] {
				t.Fatalf("output differs from upstream at byte %d (len %d vs %d)", i, len(got), len(blob))
			}
		}
		t.Fatalf("output length %d, upstream %d", len(got), len(blob))
	}
}

func TestRoundTrip(t *testing.T) {
	for _, f := range []Format{FormatPAX, FormatUSTAR} {
		for _, size := range []int{0, 1, 511, 512, 513, 5000, 1 << 16} {
			payload := make([]byte, size)
			for i := range payload {
				payload[i] = byte(i*7 + 3)
			}
			var out bytes.Buffer
			if err := Write(&out, CommitName, bytes.NewReader(payload), int64(size), WithFormat(f)); err != nil {
				t.Fatalf("%v/%d: Write: %v", f, size, err)
			}
			wantOff := int64(1536)
			if f == FormatUSTAR {
				wantOff = 512
			}
			if pad := (512 - size%512) % 512; out.Len() != int(wantOff)+size+pad+1024 {
				t.Fatalf("%v/%d: blob is %d bytes, want %d", f, size, out.Len(), int(wantOff)+size+pad+1024)
			}
			sr, wrapped, err := NewReader(bytes.NewReader(out.Bytes()), int64(out.Len()))
			if err != nil || !wrapped {
				t.Fatalf("%v/%d: NewReader wrapped %v err %v", f, size, wrapped, err)
			}
			got, _ := io.ReadAll(sr)
			if !bytes.Equal(got, payload) {
				t.Fatalf("%v/%d: payload did not round-trip", f, size)
			}
			if _, err := sr.Seek(0, io.SeekStart); err != nil {
				t.Fatal(err)
			}
			if off := sr.Size(); off != int64(size) {
				t.Fatalf("%v/%d: section size %d", f, size, off)
			}
			// Both layouts are valid tar archives with one regular file.
			checkStdlibTar(t, out.Bytes(), f, payload)
		}
	}
}

func checkStdlibTar(t *testing.T, blob []byte, f Format, payload []byte) {
	t.Helper()
	tr := tar.NewReader(bytes.NewReader(blob))
	h, err := tr.Next()
	if err != nil || h.Name != CommitName {
		t.Fatalf("%v: archive/tar Next = %v, %v", f, h, err)
	}
	// archive/tar honours the PAX size record, so it sees the payload in both.
	got, err := io.ReadAll(tr)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("%v: archive/tar reads a different payload (%d bytes, %v)", f, len(got), err)
	}
	if _, err := tr.Next(); err != io.EOF {
		t.Fatalf("%v: archive/tar sees more than one entry: %v", f, err)
	}
}

func TestStreamingWriterLimits(t *testing.T) {
	for _, f := range []Format{FormatPAX, FormatUSTAR} {
		var out bytes.Buffer
		w, err := NewWriter(&out, CommitName, 10, WithFormat(f))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(make([]byte, 6)); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(make([]byte, 6)); !errors.Is(err, ErrWriteTooLong) {
			t.Fatalf("%v: overlong write err = %v, want ErrWriteTooLong", f, err)
		}
		if err := w.Close(); !errors.Is(err, ErrShortPayload) {
			t.Fatalf("%v: short close err = %v, want ErrShortPayload", f, err)
		}
	}
	if err := Write(io.Discard, CommitName, bytes.NewReader(make([]byte, 3)), 10); !errors.Is(err, ErrShortPayload) {
		t.Fatalf("short payload reader: err = %v", err)
	}
	for _, name := range []string{"", string(make([]byte, 100)), "a\x00b"} {
		if _, err := NewWriter(io.Discard, name, 1); err == nil {
			t.Fatalf("name %q accepted", name)
		}
	}
	if _, err := NewWriter(io.Discard, CommitName, -1); err == nil {
		t.Fatal("negative size accepted")
	}
	if _, err := NewWriter(io.Discard, CommitName, 1, WithFormat(Format(9))); err == nil {
		t.Fatal("unknown format accepted")
	}
	if _, err := NewWriter(io.Discard, CommitName, 8<<30, WithFormat(FormatUSTAR)); err == nil {
		t.Fatal("ustar form accepted an 8 GiB payload it cannot encode")
	}
}

func TestNotWrapped(t *testing.T) {
	rnd := make([]byte, 4096)
	for i := range rnd {
		rnd[i] = byte(rand.IntN(256))
	}
	var gnu bytes.Buffer
	tw := tar.NewWriter(&gnu)
	if err := tw.WriteHeader(&tar.Header{Name: CommitName, Size: 1, Mode: 0o644, Format: tar.FormatGNU}); err != nil {
		t.Fatal(err)
	}
	_, _ = tw.Write([]byte{1})
	_ = tw.Close()
	if string(gnu.Bytes()[257:265]) != "ustar  \x00" {
		t.Fatalf("archive/tar did not write a GNU header: %q", gnu.Bytes()[257:265])
	}
	blob := readHello(t)
	for name, b := range map[string][]byte{
		"empty": nil, "short": []byte("ustar"), "random": rnd, "gnu": gnu.Bytes(),
		"bare zfile": blob[1536:],
	} {
		off, n, ok, err := detectBytes(b)
		if ok || err != nil || off != 0 || n != 0 {
			t.Errorf("%s: Detect = %d,%d,%v,%v; want not wrapped, no error", name, off, n, ok, err)
		}
		sr, wrapped, err := NewReader(bytes.NewReader(b), int64(len(b)))
		if err != nil || wrapped || sr.Size() != int64(len(b)) {
			t.Errorf("%s: NewReader should pass the whole blob through", name)
		}
	}
}

// fixChecksum recomputes a hand-edited header's checksum.
func fixChecksum(b []byte) { setChecksum((*[BlockSize]byte)(b[:BlockSize])) }

type badCase struct {
	blob []byte
	want error
}

// withPAXRecords returns the real blob with its PAX records replaced by rec.
func withPAXRecords(blob []byte, rec string) []byte {
	b := bytes.Clone(blob)
	copy(b[512:1024], make([]byte, 512))
	copy(b[512:], rec)
	octNoNUL(b[offSize:offSize+lenSize], int64(len(rec)))
	fixChecksum(b)
	return b
}

// edited returns a copy of b changed by edit, with the first header's
// checksum fixed so that only edit's change counts.
func edited(b []byte, edit func([]byte)) []byte {
	b = bytes.Clone(b)
	edit(b)
	fixChecksum(b)
	return b
}

func badWrappers(t testing.TB) map[string]badCase {
	blob := readHello(t)
	var out bytes.Buffer
	if err := Write(&out, CommitName, bytes.NewReader(make([]byte, 600)), 600, WithFormat(FormatUSTAR)); err != nil {
		t.Fatal(err)
	}
	plain := out.Bytes()
	return map[string]badCase{
		"truncated payload": {blob[:100000], ErrTruncated},
		"truncated headers": {blob[:1000], ErrTruncated},
		"truncated plain":   {plain[:900], ErrTruncated},
		"bad checksum": {func() []byte {
			b := bytes.Clone(blob[:4096])
			b[offChksum+3]++
			return b
		}(), ErrMalformed},
		"bad second header": {func() []byte {
			b := bytes.Clone(blob)
			b[1024+offChksum+3]++
			return b
		}(), ErrMalformed},
		"size beyond file":   {withPAXRecords(blob, paxRecord("size", "999999999")), ErrTruncated},
		"pax without size":   {withPAXRecords(blob, paxRecord("path", CommitName)), ErrMalformed},
		"pax negative size":  {withPAXRecords(blob, paxRecord("size", "-5")), ErrMalformed},
		"pax record garbage": {withPAXRecords(blob, "hello world\n"), ErrMalformed},
		"pax records span two blocks": {edited(blob, func(b []byte) {
			octNoNUL(b[offSize:offSize+lenSize], 600)
		}), ErrMalformed},
		"pax bad record length": {func() []byte {
			b := bytes.Clone(blob)
			b[512] = '9' // "95 size=..." runs past the records
			return b
		}(), ErrMalformed},
		"directory entry": {edited(plain, func(b []byte) { b[offTypeflag] = '5' }), ErrMalformed},
		"bad octal size":  {edited(plain, func(b []byte) { copy(b[offSize:], "0000009x000\x00") }), ErrMalformed},
		"negative base-256 size": {edited(plain, func(b []byte) {
			copy(b[offSize:offSize+lenSize], bytes.Repeat([]byte{0xff}, lenSize))
		}), ErrMalformed},
	}
}

func TestDetectBadInputs(t *testing.T) {
	for name, c := range badWrappers(t) {
		_, _, ok, err := detectBytes(c.blob)
		if ok || !errors.Is(err, c.want) {
			t.Errorf("%s: Detect ok=%v err=%v, want %v", name, ok, err, c.want)
		}
		if _, _, err := NewReader(bytes.NewReader(c.blob), int64(len(c.blob))); err == nil {
			t.Errorf("%s: NewReader accepted a bad wrapper", name)
		}
	}
}

func TestBase256Size(t *testing.T) {
	var out bytes.Buffer
	if err := Write(&out, CommitName, bytes.NewReader(make([]byte, 700)), 700, WithFormat(FormatUSTAR)); err != nil {
		t.Fatal(err)
	}
	b := out.Bytes()
	field := make([]byte, lenSize)
	field[0] = 0x80
	field[10], field[11] = 700>>8, 700&0xff
	copy(b[offSize:], field)
	fixChecksum(b)
	off, n, ok, err := detectBytes(b)
	if err != nil || !ok || off != 512 || n != 700 {
		t.Fatalf("base-256 size: Detect = %d,%d,%v,%v; want 512,700", off, n, ok, err)
	}
}

// errReaderAt fails every read, as a broken network cache would.
type errReaderAt struct{}

func (errReaderAt) ReadAt([]byte, int64) (int, error) { return 0, errors.New("boom") }

func TestDetectReadError(t *testing.T) {
	if _, _, _, err := Detect(errReaderAt{}, 4096); err == nil {
		t.Fatal("read error swallowed")
	}
}

func FuzzDetect(f *testing.F) {
	blob := readHello(f)
	f.Add(blob[:4096])
	f.Add(blob[:1536])
	for _, form := range []Format{FormatPAX, FormatUSTAR} {
		var out bytes.Buffer
		if err := Write(&out, CommitName, bytes.NewReader([]byte("payload")), 7, WithFormat(form)); err != nil {
			f.Fatal(err)
		}
		f.Add(out.Bytes())
	}
	f.Add([]byte("not a tar"))
	for _, c := range badWrappers(f) {
		f.Add(c.blob[:min(len(c.blob), 4096)])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		off, n, ok, err := detectBytes(b)
		if err != nil && ok {
			t.Fatal("ok with an error")
		}
		if !ok {
			return
		}
		if off != 512 && off != 1536 {
			t.Fatalf("payload offset %d", off)
		}
		if n < 0 || off+n > int64(len(b)) {
			t.Fatalf("payload [%d,+%d) outside a %d-byte blob", off, n, len(b))
		}
	})
}
