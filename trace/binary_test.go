package trace

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"hash/crc32"
	"math"
	"os"
	"reflect"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/golden.trace from WriteBinary")

const goldenPath = "testdata/golden.trace"

// goldenFrames is the record list behind testdata/golden.trace; the last frame is longer than
// MaxRecordLength and must become two records.
var goldenFrames = []Frame{
	{Layer: 0, Offset: 0, Length: 4096, TimeNS: 5},
	{Layer: 2, Offset: 1 << 30, Length: 128 << 10, TimeNS: 6},
	{Layer: 1, Offset: 512, Length: 512, TimeNS: 7},
	{Layer: 0, Offset: 8192, Length: 1<<20 + 4096, TimeNS: 8},
}

// goldenRecords is goldenFrames as upstream records them: layer, count, offset.
var goldenRecords = [][3]uint64{
	{0, 4096, 0},
	{2, 128 << 10, 1 << 30},
	{1, 512, 512},
	{0, 1 << 20, 8192},
	{0, 4096, 8192 + 1<<20},
}

// crc32cBitwise is CRC32C computed bit by bit from its definition — reflected Castagnoli
// polynomial 0x82F63B78, no inversion on entry or exit — independently of internal/crc32c.
func crc32cBitwise(crc uint32, p []byte) uint32 {
	for _, b := range p {
		crc ^= uint32(b)
		for range 8 {
			if crc&1 != 0 {
				crc = crc>>1 ^ 0x82F63B78
			} else {
				crc >>= 1
			}
		}
	}
	return crc
}

// handBuiltGolden lays out goldenRecords following overlaybd-formats.md §4 field by field.
func handBuiltGolden(t *testing.T) []byte {
	// The standard CRC32C check value pins the bitwise loop down before it is trusted.
	if got := ^crc32cBitwise(0xFFFFFFFF, []byte("123456789")); got != 0xE3069283 {
		t.Fatalf("bitwise CRC32C check value = %#x, want 0xe3069283", got)
	}
	var records []byte
	for _, r := range goldenRecords {
		rec := make([]byte, 24)
		rec[0] = 'R' // bytes 1..3: zero padding
		binary.LittleEndian.PutUint32(rec[4:], uint32(r[0]))
		binary.LittleEndian.PutUint64(rec[8:], r[1])
		binary.LittleEndian.PutUint64(rec[16:], r[2])
		records = append(records, rec...)
	}
	hdr := make([]byte, 24)
	copy(hdr, []byte{0x20, 0x18, 0xEF, 0xC2}) // magic; bytes 4..7 zero
	binary.LittleEndian.PutUint64(hdr[8:], uint64(24*len(goldenRecords)))
	binary.LittleEndian.PutUint32(hdr[16:], crc32cBitwise(0, records)) // bytes 20..23 zero
	return append(hdr, records...)
}

func TestMagicIsCRC32OfName(t *testing.T) {
	if got := crc32.ChecksumIEEE([]byte("Container Image Trace Format")); got != BinaryMagic {
		t.Fatalf("zlib CRC32 of the format name = %#x, BinaryMagic = %#x", got, BinaryMagic)
	}
}

func TestBinaryGolden(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteBinary(&buf, goldenFrames); err != nil {
		t.Fatal(err)
	}
	if *update {
		if err := os.WriteFile(goldenPath, buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	golden, err := os.ReadFile(goldenPath)
	if err != nil {
		t.Fatal(err)
	}
	if want := handBuiltGolden(t); !bytes.Equal(golden, want) {
		t.Fatalf("%s differs from the layout built from the spec:\n got %x\nwant %x", goldenPath, golden, want)
	}
	if !bytes.Equal(buf.Bytes(), golden) {
		t.Fatalf("WriteBinary output differs from %s:\n got %x\nwant %x", goldenPath, buf.Bytes(), golden)
	}
	frames, err := ReadBinary(bytes.NewReader(golden), 0)
	if err != nil {
		t.Fatal(err)
	}
	var want []Frame
	for _, r := range goldenRecords {
		want = append(want, Frame{Layer: int(r[0]), Offset: int64(r[2]), Length: int64(r[1])})
	}
	if !reflect.DeepEqual(frames, want) {
		t.Fatalf("ReadBinary(golden) = %+v, want %+v", frames, want)
	}
}

// TestBinaryFlippedByte flips every byte of the golden file in turn. Only the header's two
// reserved words may change unnoticed (upstream ignores them too); anything else must fail with
// the error naming what broke.
func TestBinaryFlippedByte(t *testing.T) {
	golden := handBuiltGolden(t)
	want, err := ReadBinary(bytes.NewReader(golden), 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := range golden {
		data := bytes.Clone(golden)
		data[i] ^= 0xFF
		frames, err := ReadBinary(bytes.NewReader(data), 0)
		switch {
		case i >= 4 && i < 8 || i >= 20 && i < 24:
			if err != nil || !reflect.DeepEqual(frames, want) {
				t.Errorf("byte %d (reserved) flipped: err %v, frames changed %v", i, err, !reflect.DeepEqual(frames, want))
			}
		case i < 4:
			wantErr(t, i, err, ErrBadMagic, "bad magic")
		case i < 16:
			if !errors.Is(err, ErrSize) && !errors.Is(err, ErrTooLarge) && !errors.Is(err, ErrTruncated) {
				t.Errorf("byte %d (data_size) flipped: err = %v, want a size error", i, err)
			}
		default: // the checksum itself or any record byte, padding included
			wantErr(t, i, err, ErrChecksum, "checksum mismatch")
		}
	}
}

func wantErr(t *testing.T, i int, err, target error, text string) {
	t.Helper()
	if !errors.Is(err, target) || !strings.Contains(err.Error(), text) {
		t.Errorf("byte %d flipped: err = %v, want %v", i, err, target)
	}
}

// binaryFile assembles a binary trace from raw records with a correct checksum.
func binaryFile(records ...[]byte) []byte {
	body := bytes.Join(records, nil)
	hdr := make([]byte, 24)
	binary.LittleEndian.PutUint32(hdr, BinaryMagic)
	binary.LittleEndian.PutUint64(hdr[8:], uint64(len(body)))
	binary.LittleEndian.PutUint32(hdr[16:], crc32cBitwise(0, body))
	return append(hdr, body...)
}

func record(op byte, layer uint32, count, offset uint64) []byte {
	rec := make([]byte, 24)
	rec[0] = op
	binary.LittleEndian.PutUint32(rec[4:], layer)
	binary.LittleEndian.PutUint64(rec[8:], count)
	binary.LittleEndian.PutUint64(rec[16:], offset)
	return rec
}

func TestReadBinarySkipsNonReads(t *testing.T) {
	padded := record('R', 3, 8192, 4096)
	copy(padded[1:4], "xyz") // upstream leaves padding uninitialised
	data := binaryFile(record('W', 1, 4096, 0), padded, record('R', 0, 0, 99), record('R', 2, 512, 1024))
	frames, err := ReadBinary(bytes.NewReader(data), 0)
	if err != nil {
		t.Fatal(err)
	}
	want := []Frame{{Layer: 3, Offset: 4096, Length: 8192}, {Layer: 2, Offset: 1024, Length: 512}}
	if !reflect.DeepEqual(frames, want) {
		t.Fatalf("frames = %+v, want %+v (write and empty records skipped)", frames, want)
	}
}

func TestReadBinaryRejects(t *testing.T) {
	good := binaryFile(record('R', 0, 4096, 0), record('R', 1, 4096, 8192))
	badSum := bytes.Clone(good)
	badSum[16]++
	misaligned := bytes.Clone(good)
	binary.LittleEndian.PutUint64(misaligned[8:], 47)
	overflow := binaryFile(record('R', 0, 4096, math.MaxInt64-100))
	overflowBadSum := bytes.Clone(overflow)
	overflowBadSum[16]++
	tests := []struct {
		name    string
		data    []byte
		maxSize int64
		want    error
	}{
		{"empty", nil, 0, ErrTruncated},
		{"short header", good[:20], 0, ErrTruncated},
		{"wrong magic", append([]byte{0x21}, good[1:]...), 0, ErrBadMagic},
		{"data_size not whole records", misaligned, 0, ErrSize},
		{"records cut short", good[:len(good)-1], 0, ErrTruncated},
		{"trailing byte", append(bytes.Clone(good), 0), 0, ErrSize},
		{"checksum", badSum, 0, ErrChecksum},
		{"over maxSize", good, int64(len(good)) - 1, ErrTooLarge},
		{"maxSize below header", good, 10, ErrTooLarge},
		{"range overflows int64", overflow, 0, ErrInvalid},
		{"checksum wins over bad value", overflowBadSum, 0, ErrChecksum},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			frames, err := ReadBinary(bytes.NewReader(tc.data), tc.maxSize)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if frames != nil {
				t.Fatalf("frames returned with error: %v", frames)
			}
		})
	}
	if _, err := ReadBinary(bytes.NewReader(good), int64(len(good))); err != nil {
		t.Fatalf("maxSize equal to the file size: %v", err)
	}
}

type failWriter struct{ err error }

func (w failWriter) Write([]byte) (int, error) { return 0, w.err }

func TestWriteBinaryRejects(t *testing.T) {
	for _, tc := range []struct {
		name  string
		frame Frame
		want  error
	}{
		{"negative offset", Frame{Offset: -1, Length: 1}, ErrInvalid},
		{"empty", Frame{Length: 0}, ErrInvalid},
		{"layer beyond u32", Frame{Layer: math.MaxUint32 + 1, Length: 1}, ErrInvalid},
		{"range overflows", Frame{Offset: math.MaxInt64 - 1, Length: 2}, ErrInvalid},
		// 2^42 records: must be refused up front, not written or even summed.
		{"too many records", Frame{Length: 1 << 62}, ErrTooLarge},
	} {
		var buf bytes.Buffer
		if err := WriteBinary(&buf, []Frame{tc.frame}); !errors.Is(err, tc.want) || buf.Len() != 0 {
			t.Errorf("%s: err = %v (wrote %d bytes), want %v and nothing written", tc.name, err, buf.Len(), tc.want)
		}
	}
	boom := errors.New("disk full")
	if err := WriteBinary(failWriter{boom}, goldenFrames); !errors.Is(err, boom) {
		t.Fatalf("writer error not returned: %v", err)
	}
	var buf bytes.Buffer
	if err := WriteBinary(&buf, []Frame{{Layer: math.MaxUint32, Length: 1}}); err != nil {
		t.Fatalf("largest layer index: %v", err)
	}
}

// splitFrames is what a binary round trip should give for frames: each cut into pieces of at
// most MaxRecordLength, in order, without times.
func splitFrames(frames []Frame) []Frame {
	var out []Frame
	for _, f := range frames {
		for off, end := f.Offset, f.End(); off < end; off += MaxRecordLength {
			out = append(out, Frame{Layer: f.Layer, Offset: off, Length: min(MaxRecordLength, end-off)})
		}
	}
	return out
}

// TestPBBinaryPB converts trace.pb -> upstream binary -> Trace: every frame must survive, in
// order, with only times lost and long frames split as upstream replay needs.
func TestPBBinaryPB(t *testing.T) {
	tr := synthTrace(3000, 7)
	tr.Frames = append(tr.Frames, Frame{Layer: 1, Offset: 40 << 20, Length: 3<<20 + 512, TimeNS: 1e9})
	pb, err := MarshalPB(tr)
	if err != nil {
		t.Fatal(err)
	}
	decoded, err := UnmarshalPB(pb)
	if err != nil {
		t.Fatal(err)
	}
	var bin bytes.Buffer
	if err := ToBinary(&bin, decoded); err != nil {
		t.Fatal(err)
	}
	if got, want := bin.Len(), BinaryHeaderSize+BinaryRecordSize*(len(tr.Frames)+3); got != want {
		t.Fatalf("binary trace is %d bytes, want %d", got, want)
	}
	frames, err := ReadBinary(&bin, 0)
	if err != nil {
		t.Fatal(err)
	}
	back, err := FromBinary(frames, decoded.Layers)
	if err != nil {
		t.Fatal(err)
	}
	if want := splitFrames(tr.Frames); !reflect.DeepEqual(back.Frames, want) {
		t.Fatalf("frames changed through the binary form (%d frames, want %d)", len(back.Frames), len(want))
	}
	if !reflect.DeepEqual(back.Layers, tr.Layers) || back.Meta.Source != SourceUpstream {
		t.Fatalf("layers %v / source %v not carried over", back.Layers, back.Meta.Source)
	}
	// And the converted trace is itself a valid trace.pb, with no time column.
	pb2, err := MarshalPB(back)
	if err != nil {
		t.Fatal(err)
	}
	again, err := UnmarshalPB(pb2)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(again.Frames, back.Frames) {
		t.Fatal("converted trace does not round-trip through trace.pb")
	}
}

func TestFromBinaryChecksLayers(t *testing.T) {
	frames := []Frame{{Layer: 2, Offset: 0, Length: 4096}}
	if _, err := FromBinary(frames, synthTrace(1, 1).Layers[:2]); !errors.Is(err, ErrInvalid) {
		t.Fatalf("frame of layer 2 over 2 layers: err = %v, want ErrInvalid", err)
	}
	if err := ToBinary(&bytes.Buffer{}, &Trace{Frames: frames}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("ToBinary of a trace without its layers: err = %v, want ErrInvalid", err)
	}
}
