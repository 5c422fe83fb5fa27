package replayer

import (
	"archive/tar"
	"bytes"
	"errors"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/obdtrace/obdtrace/trace"
)

func sampleTrace() *trace.Trace {
	return &trace.Trace{
		Layers: []trace.Layer{{Digest: digest.FromString("a"), Size: 10}},
		Meta:   trace.Meta{Source: trace.SourceCLI, Runs: 1},
		Frames: []trace.Frame{{Offset: 4096, Length: 8192, TimeNS: 1000}, {Offset: 0, Length: 512, TimeNS: 2000}},
	}
}

func tarOf(t testing.TB, files map[string][]byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for name, b := range files {
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o444, Size: int64(len(b)), Typeflag: tar.TypeReg})
		tw.Write(b)
	}
	tw.Close()
	return buf.Bytes()
}

func TestLoad(t *testing.T) {
	pb, err := trace.MarshalPB(sampleTrace())
	if err != nil {
		t.Fatal(err)
	}
	var bin bytes.Buffer
	if err := trace.ToBinary(&bin, sampleTrace()); err != nil {
		t.Fatal(err)
	}
	got, err := Load(pb)
	if err != nil || len(got.Frames) != 2 || got.Layers[0].Digest != digest.FromString("a") {
		t.Fatalf("Load(pb) = %+v, %v", got, err)
	}
	got, err = Load(bin.Bytes())
	if err != nil || len(got.Frames) != 2 || len(got.Layers) != 0 || got.Frames[0].Offset != 4096 {
		t.Fatalf("Load(binary) = %+v, %v", got, err)
	}
	for _, bad := range [][]byte{nil, []byte("/etc/passwd\n"), []byte("garbage"), bin.Bytes()[:30]} {
		if _, err := Load(bad); err == nil {
			t.Errorf("Load(%q) succeeded", bad)
		}
	}

	// A trace layer prefers trace.pb; with only the binary it uses that.
	got, err = LoadLayer(bytes.NewReader(tarOf(t, map[string][]byte{"trace": bin.Bytes(), "trace.pb": pb})))
	if err != nil || len(got.Layers) != 1 {
		t.Fatalf("LoadLayer(both) = %+v, %v", got, err)
	}
	got, err = LoadLayer(bytes.NewReader(tarOf(t, map[string][]byte{"trace": bin.Bytes()})))
	if err != nil || len(got.Layers) != 0 || len(got.Frames) != 2 {
		t.Fatalf("LoadLayer(binary) = %+v, %v", got, err)
	}
	if _, err := LoadLayer(bytes.NewReader(tarOf(t, map[string][]byte{"other": pb}))); !errors.Is(err, ErrNotTrace) {
		t.Fatalf("LoadLayer(no trace) err %v", err)
	}
	if _, err := LoadLayer(bytes.NewReader([]byte("not a tar"))); err == nil {
		t.Fatal("LoadLayer(junk) succeeded")
	}
}

// FuzzLoadLayer feeds arbitrary bytes to the trace-layer reader.
func FuzzLoadLayer(f *testing.F) {
	pb, _ := trace.MarshalPB(sampleTrace())
	var bin bytes.Buffer
	trace.ToBinary(&bin, sampleTrace())
	f.Add(tarOf(f, map[string][]byte{"trace.pb": pb}))
	f.Add(tarOf(f, map[string][]byte{"trace": bin.Bytes()}))
	f.Fuzz(func(t *testing.T, b []byte) {
		LoadLayer(bytes.NewReader(b))
		Load(b)
	})
}
