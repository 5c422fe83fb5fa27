package trace

import (
	"bytes"
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/protobuf/proto"

	tracev1 "github.com/obdtrace/obdtrace/proto/obdtrace/v1"
)

// sampleTrace exercises every field and every frame path: layer switches, sequential reads,
// forward and backward jumps, a huge offset, times already at TimeResolution.
func sampleTrace() *Trace {
	return &Trace{
		Layers: []Layer{
			{Digest: digest.FromString("base"), Size: 4_737_695, MediaType: "application/vnd.oci.image.layer.v1.tar"},
			{Digest: digest.FromString("app"), Size: 1 << 40, MediaType: "application/vnd.docker.image.rootfs.diff.tar"},
			{Digest: digest.FromString("trace"), Size: 0},
		},
		Meta: Meta{
			Start:           time.Unix(1_700_000_000, 123_456_789).UTC(),
			Duration:        90 * time.Second,
			KernelRelease:   "6.18.0-obd",
			RecorderVersion: "v0.1.0",
			Source:          SourceLabel,
			Runs:            3,
			ImageRef:        "registry.example:5000/app:1.2",
			ManifestDigest:  digest.FromString("manifest"),
		},
		Frames: []Frame{
			{Layer: 1, Offset: 1 << 20, Length: 4096, TimeNS: 0},
			{Layer: 1, Offset: 1<<20 + 4096, Length: 128 << 10, TimeNS: 3_000},
			{Layer: 0, Offset: 0, Length: 512, TimeNS: 3_000},
			{Layer: 1, Offset: 4096, Length: 8192, TimeNS: 1_000_000},
			{Layer: 0, Offset: 512, Length: 1 << 30, TimeNS: 7_000_000_000},
			{Layer: 2, Offset: 63 << 30, Length: 512, TimeNS: 7_000_001_000},
			{Layer: 2, Offset: 63<<30 + 512, Length: 1024, TimeNS: 7_000_001_000},
			{Layer: 1, Offset: 1 << 20, Length: 4096, TimeNS: 7_000_002_000},
		},
	}
}

func TestPBRoundTripExact(t *testing.T) {
	tr := sampleTrace()
	b, err := MarshalPB(tr)
	if err != nil {
		t.Fatal(err)
	}
	got, err := UnmarshalPB(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, tr) {
		t.Fatalf("round trip changed the trace:\n got %+v\nwant %+v", got, tr)
	}
	again, err := MarshalPB(got)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again, b) {
		t.Fatal("re-encoding a decoded trace gives different bytes")
	}
}

// TestPBRoundTripSynthetic checks a large trace with ns times: everything is kept, times to
// TimeResolution.
func TestPBRoundTripSynthetic(t *testing.T) {
	tr := synthTrace(20000, 3)
	b, err := MarshalPB(tr)
	if err != nil {
		t.Fatal(err)
	}
	got, err := UnmarshalPB(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Frames) != len(tr.Frames) {
		t.Fatalf("%d frames back, want %d", len(got.Frames), len(tr.Frames))
	}
	res := int64(TimeResolution)
	for i, f := range tr.Frames {
		f.TimeNS -= f.TimeNS % res
		if got.Frames[i] != f {
			t.Fatalf("frame %d = %+v, want %+v", i, got.Frames[i], f)
		}
	}
}

func TestPBTimeRounding(t *testing.T) {
	tr := sampleTrace()
	tr.Frames = tr.Frames[:3]
	tr.Frames[0].TimeNS = 999
	tr.Frames[1].TimeNS = 1_999
	tr.Frames[2].TimeNS = 2_000
	b, err := MarshalPB(tr)
	if err != nil {
		t.Fatal(err)
	}
	got, err := UnmarshalPB(b)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []int64{0, 1_000, 2_000} {
		if got.Frames[i].TimeNS != want {
			t.Errorf("frame %d time %d ns, want %d (rounded down to %v)", i, got.Frames[i].TimeNS, want, TimeResolution)
		}
	}
}

// framesPB decodes the Frames message MarshalPB wrote for tr.
func framesPB(t *testing.T, tr *Trace) *tracev1.Frames {
	t.Helper()
	b, err := MarshalPB(tr)
	if err != nil {
		t.Fatal(err)
	}
	var msg tracev1.Trace
	if err := proto.Unmarshal(b, &msg); err != nil {
		t.Fatal(err)
	}
	return msg.Frames
}

func TestPBUnits(t *testing.T) {
	tr := sampleTrace()
	if fs := framesPB(t, tr); fs.UnitShift != 9 {
		t.Errorf("512-aligned frames: unit shift %d, want 9", fs.UnitShift)
	}
	tr.Frames = []Frame{{Layer: 0, Offset: 8192, Length: 4096}, {Layer: 0, Offset: 65536, Length: 12288}}
	fs := framesPB(t, tr)
	if fs.UnitShift != 12 {
		t.Errorf("4 KiB-aligned frames: unit shift %d, want 12", fs.UnitShift)
	}
	// Sequential frames need no jump; all-zero times need no time column.
	if len(fs.Jump) != 2 || len(fs.Layer) != 1 || len(fs.TimeDelta) != 0 {
		t.Errorf("columns: %d jumps, %d layers, %d time deltas; want 2, 1, 0", len(fs.Jump), len(fs.Layer), len(fs.TimeDelta))
	}
	// Unaligned frames still round-trip, with a unit of one byte.
	tr.Frames = []Frame{{Layer: 0, Offset: 1, Length: 3, TimeNS: 5000}, {Layer: 2, Offset: math.MaxInt64 - 7, Length: 7}}
	if fs := framesPB(t, tr); fs.UnitShift != 0 {
		t.Errorf("unaligned frames: unit shift %d, want 0", fs.UnitShift)
	}
	b, err := MarshalPB(tr)
	if err != nil {
		t.Fatal(err)
	}
	got, err := UnmarshalPB(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.Frames, tr.Frames) {
		t.Fatalf("unaligned frames: got %+v, want %+v", got.Frames, tr.Frames)
	}
}

func TestPBPrefixDetected(t *testing.T) {
	for _, tr := range []*Trace{{}, sampleTrace()} {
		b, err := MarshalPB(tr)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.HasPrefix(b, []byte(pbPrefix)) || Detect(b) != KindProtobuf {
			t.Fatalf("encoding starts %q, Detect says %v", b[:min(len(b), 16)], Detect(b))
		}
	}
}

func TestMarshalPBRejects(t *testing.T) {
	for name, mutate := range map[string]func(*Trace){
		"layer index out of range": func(tr *Trace) { tr.Frames[2].Layer = 3 },
		"negative layer index":     func(tr *Trace) { tr.Frames[2].Layer = -1 },
		"empty frame":              func(tr *Trace) { tr.Frames[0].Length = 0 },
		"negative offset":          func(tr *Trace) { tr.Frames[0].Offset = -4096 },
		"range overflows":          func(tr *Trace) { tr.Frames[0].Offset = math.MaxInt64 },
		"negative time":            func(tr *Trace) { tr.Frames[1].TimeNS = -1 },
		"bad layer digest":         func(tr *Trace) { tr.Layers[0].Digest = "sha256:1234" },
		"negative layer size":      func(tr *Trace) { tr.Layers[0].Size = -1 },
		"bad manifest digest":      func(tr *Trace) { tr.Meta.ManifestDigest = "nope" },
		"start beyond ns range":    func(tr *Trace) { tr.Meta.Start = time.Date(3000, 1, 1, 0, 0, 0, 0, time.UTC) },
		"negative duration":        func(tr *Trace) { tr.Meta.Duration = -time.Second },
		"negative runs":            func(tr *Trace) { tr.Meta.Runs = -1 },
		"too many layers":          func(tr *Trace) { tr.Layers = make([]Layer, MaxLayers+1) },
		"kernel release not UTF-8": func(tr *Trace) { tr.Meta.KernelRelease = "6.18\xff" },
	} {
		tr := sampleTrace()
		mutate(tr)
		b, err := MarshalPB(tr)
		if err == nil || b != nil {
			t.Errorf("%s: MarshalPB succeeded", name)
			continue
		}
		if !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrTooLarge) {
			t.Errorf("%s: err = %v, want ErrInvalid or ErrTooLarge", name, err)
		}
	}
}

// validPB is sampleTrace as a message, for corrupting field by field.
func validPB(t *testing.T) *tracev1.Trace {
	t.Helper()
	b, err := MarshalPB(sampleTrace())
	if err != nil {
		t.Fatal(err)
	}
	var msg tracev1.Trace
	if err := proto.Unmarshal(b, &msg); err != nil {
		t.Fatal(err)
	}
	return &msg
}

func TestUnmarshalPBRejects(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*tracev1.Trace)
		want   error
	}{
		{"no format", func(m *tracev1.Trace) { m.Format = "" }, ErrFormat},
		{"future format", func(m *tracev1.Trace) { m.Format = "obdtrace.v2" }, ErrFormat},
		{"too many layers", func(m *tracev1.Trace) {
			m.Layers = make([]*tracev1.Layer, MaxLayers+1)
			for i := range m.Layers {
				m.Layers[i] = &tracev1.Layer{Digest: string(digest.FromString("x"))}
			}
		}, ErrTooLarge},
		{"bad layer digest", func(m *tracev1.Trace) { m.Layers[1].Digest = "md5:abc" }, ErrInvalid},
		{"layer size overflows", func(m *tracev1.Trace) { m.Layers[1].Size = math.MaxInt64 + 1 }, ErrInvalid},
		{"bad manifest digest", func(m *tracev1.Trace) { m.Metadata.ManifestDigest = "sha256:zz" }, ErrInvalid},
		{"negative duration", func(m *tracev1.Trace) { m.Metadata.DurationNs = -1 }, ErrInvalid},
		{"time column short", func(m *tracev1.Trace) { m.Frames.TimeDelta = m.Frames.TimeDelta[1:] }, ErrInvalid},
		{"first frame without layer", func(m *tracev1.Trace) { m.Frames.Head[0] &^= headLayerChanged }, ErrInvalid},
		{"layer column short", func(m *tracev1.Trace) { m.Frames.Layer = m.Frames.Layer[:2] }, ErrInvalid},
		{"layer column long", func(m *tracev1.Trace) { m.Frames.Layer = append(m.Frames.Layer, 0) }, ErrInvalid},
		{"layer index out of range", func(m *tracev1.Trace) { m.Frames.Layer[0] = 3 }, ErrInvalid},
		{"jump column short", func(m *tracev1.Trace) { m.Frames.Jump = m.Frames.Jump[:1] }, ErrInvalid},
		{"jump column long", func(m *tracev1.Trace) { m.Frames.Jump = append(m.Frames.Jump, 1) }, ErrInvalid},
		{"jump below zero", func(m *tracev1.Trace) { m.Frames.Jump[0] = -1 << 20 }, ErrInvalid},
		{"jump overflows", func(m *tracev1.Trace) { m.Frames.Jump[0] = math.MaxInt64 }, ErrInvalid},
		{"jump past int64", func(m *tracev1.Trace) { m.Frames.Jump[0] = math.MaxInt64 >> 9 }, ErrInvalid},
		{"length overflows", func(m *tracev1.Trace) { m.Frames.Head[4] = math.MaxUint64 &^ 3 }, ErrInvalid},
		{"unit shift too big", func(m *tracev1.Trace) { m.Frames.UnitShift = 31 }, ErrInvalid},
		{"time unit too big", func(m *tracev1.Trace) { m.Frames.TimeUnitNs = 2e9 }, ErrInvalid},
		{"time before start", func(m *tracev1.Trace) { m.Frames.TimeDelta[1] = -1 }, ErrInvalid},
		{"time overflows", func(m *tracev1.Trace) { m.Frames.TimeDelta[1] = math.MaxInt64 / 1000 }, ErrInvalid},
		{"time delta overflows", func(m *tracev1.Trace) { m.Frames.TimeDelta[1] = math.MaxInt64 }, ErrInvalid},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := validPB(t)
			tc.mutate(m)
			b, err := proto.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			got, err := UnmarshalPB(b)
			if !errors.Is(err, tc.want) || got != nil {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
	for name, data := range map[string][]byte{
		"garbage":     []byte("\xff\xff\xff\xff"),
		"binary":      handBuiltGolden(t),
		"path list":   []byte("/usr/bin/\n"),
		"format only": []byte("\x0a\x03abc"),
	} {
		if _, err := UnmarshalPB(data); !errors.Is(err, ErrFormat) {
			t.Errorf("%s: err = %v, want ErrFormat", name, err)
		}
	}
	long := strings.Repeat("x", 1000)
	b, _ := proto.Marshal(&tracev1.Trace{Format: long})
	if _, err := UnmarshalPB(b); err == nil || strings.Contains(err.Error(), long) {
		t.Errorf("a long bad format should be reported shortened, got %v", err)
	}
}

// TestUnmarshalPBTolerant accepts what a different but correct encoder may write.
func TestUnmarshalPBTolerant(t *testing.T) {
	m := validPB(t)
	m.Frames.TimeUnitNs = 0 // 0 means ns
	m.Frames.TimeDelta = []int64{5, 1, 1, 1, 1, 1, 1, 1}
	m.Frames.Head[1] |= headLayerChanged | headJumped // redundant layer and zero jump
	m.Frames.Layer = append([]uint32{1}, m.Frames.Layer...)
	m.Frames.Layer[0], m.Frames.Layer[1] = m.Frames.Layer[1], m.Frames.Layer[0]
	m.Frames.Jump = append([]int64{m.Frames.Jump[0], 0}, m.Frames.Jump[1:]...)
	m.Metadata.Source = 42 // a source from a newer writer
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	got, err := UnmarshalPB(b)
	if err != nil {
		t.Fatal(err)
	}
	want := sampleTrace()
	for i := range want.Frames {
		want.Frames[i].TimeNS = int64(5 + i)
	}
	want.Meta.Source = 42
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
}

func TestSourceString(t *testing.T) {
	if SourceFleet.String() != "fleet" || Source(42).String() != "Source(42)" {
		t.Fatalf("Source strings: %v, %v", SourceFleet, Source(42))
	}
}
