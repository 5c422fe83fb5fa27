package recorder

import (
	"bytes"
	"os"
	"reflect"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/lsmt"
	"github.com/obdtrace/obdtrace/recorder/image"
	"github.com/obdtrace/obdtrace/trace"
)

func openBlob(t *testing.T, path string) (*lsmt.Blob, trace.Layer) {
	t.Helper()
	b := testdata.OpenBlob(t, path)
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	d, err := digest.FromReader(f)
	if err != nil {
		t.Fatal(err)
	}
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return b, trace.Layer{Digest: d, Size: st.Size(), MediaType: ocispec.MediaTypeImageLayer}
}

// TestMapperUpstreamImage reads the whole disk of upstream's baselayer + hello-world image in
// 1 MiB requests: every visible data byte of each layer lands in exactly one frame, within
// the layer's data area, and a second pass records nothing.
func TestMapperUpstreamImage(t *testing.T) {
	base, baseLayer := openBlob(t, testdata.Baselayer(t))
	hello, helloLayer := openBlob(t, testdata.Blob(t, testdata.HelloLayerDigest))
	stack, err := lsmt.NewStack([]lsmt.StackLayer{base, hello})
	if err != nil {
		t.Fatal(err)
	}
	visible := make([]int64, 2)
	segs := stack.Segments()
	for _, s := range segs {
		if !s.Zeroed {
			visible[s.Tag] += int64(s.Length) * lsmt.SectorSize
		}
	}
	if visible[0] == 0 || visible[1] == 0 {
		t.Fatalf("visible data per layer %v: the image should use both layers", visible)
	}
	m, err := NewMapper(stack, MapperOptions{})
	if err != nil {
		t.Fatal(err)
	}
	end := segs[len(segs)-1].End()
	pass := func() {
		for s := uint64(0); s < end; s += 2048 {
			m.Add(Request{TimeNS: int64(s), Sector: s, Sectors: 2048})
		}
	}
	pass()
	st := m.Stats()
	if !reflect.DeepEqual(st.LayerBytes, visible) || st.Truncated {
		t.Fatalf("recorded %v bytes per layer, want the visible data %v (stats %+v)", st.LayerBytes, visible, st)
	}
	dataEnd := []int64{int64(base.Trailer().IndexOffset), int64(hello.Trailer().IndexOffset)}
	for i, f := range m.Frames() {
		if f.Offset < lsmt.HeaderSize || f.End() > dataEnd[f.Layer] {
			t.Fatalf("frame %d %+v outside layer %d's data [4096, %d)", i, f, f.Layer, dataEnd[f.Layer])
		}
	}
	frames := st.Frames
	pass()
	if st2 := m.Stats(); st2.Frames != frames || st2.RereadBytes != visible[0]+visible[1] {
		t.Errorf("second pass: %d frames (was %d), %d bytes re-read", st2.Frames, frames, st2.RereadBytes)
	}

	tr, err := m.Trace([]trace.Layer{baseLayer, helloLayer}, trace.Meta{Source: trace.SourceCLI, Runs: 1})
	if err != nil {
		t.Fatal(err)
	}
	l, err := image.BuildLayer(tr, ocispec.MediaTypeImageLayer)
	if err != nil {
		t.Fatal(err)
	}
	back, err := image.ReadLayer(bytes.NewReader(l.Data), nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range tr.Frames { // trace.pb keeps times to the microsecond
		tr.Frames[i].TimeNS -= tr.Frames[i].TimeNS % int64(trace.TimeResolution)
	}
	if !reflect.DeepEqual(back.Frames, tr.Frames) {
		t.Fatal("frames changed through the trace layer")
	}
	t.Logf("%d segments, %d frames, %d bytes per layer, trace layer %d bytes", len(segs), frames, visible, len(l.Data))
}
