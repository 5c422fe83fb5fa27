package recorder

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/internal/crc32c"
	"github.com/obdtrace/obdtrace/recorder/image"
	"github.com/obdtrace/obdtrace/trace"
)

func smallTrace() *trace.Trace {
	return &trace.Trace{
		Layers: []trace.Layer{
			{Digest: digest.Digest(fmt.Sprintf("sha256:%064x", 1)), Size: 1 << 20},
			{Digest: digest.Digest(fmt.Sprintf("sha256:%064x", 2)), Size: 1 << 21},
		},
		Meta: trace.Meta{Source: trace.SourceCLI, Runs: 1},
		Frames: []trace.Frame{
			{Layer: 1, Offset: 4096, Length: 8192, TimeNS: 3000},
			{Layer: 0, Offset: 0, Length: 4096, TimeNS: 5000},
		},
	}
}

func TestTraceFileRoundTrips(t *testing.T) {
	want := smallTrace()
	dir := t.TempDir()
	pbPath, obdPath := filepath.Join(dir, "t.pb"), filepath.Join(dir, "t.obd")
	if err := WriteTraceFile(pbPath, want, FormatPB); err != nil {
		t.Fatal(err)
	}
	if got, err := ReadTraceFile(pbPath, nil); err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("trace.pb read back %+v, %v", got, err)
	}
	if err := WriteTraceFile(obdPath, want, FormatOBD); err != nil {
		t.Fatal(err)
	}
	got, err := ReadTraceFile(obdPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Layers) != 2 || got.Layers[0].Digest != "" || len(got.Frames) != 2 || got.Frames[0].Offset != 4096 ||
		got.Frames[0].TimeNS != 0 || got.Meta.Source != trace.SourceUpstream {
		t.Errorf("binary read without layers: %+v", got)
	}
	if _, err := EncodeTrace(got, FormatPB); !errors.Is(err, trace.ErrInvalid) {
		t.Errorf("trace.pb of placeholder layers: %v, want trace.ErrInvalid", err)
	}
	if got, err := ReadTraceFile(obdPath, want.Layers); err != nil || got.Layers[1].Digest != want.Layers[1].Digest {
		t.Errorf("binary read with layers: %+v, %v", got, err)
	}
	layer, err := image.BuildLayer(want, ocispec.MediaTypeImageLayer)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := DecodeTrace(layer.Data, nil); err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("trace layer read back %+v, %v", got, err)
	}
	if _, err := EncodeTrace(want, "json"); !errors.Is(err, ErrFormat) {
		t.Errorf("unknown format: %v", err)
	}
}

func TestDecodeTraceRejects(t *testing.T) {
	// A valid binary trace whose record names layer 300.
	rec := make([]byte, trace.BinaryRecordSize)
	rec[0] = 'R'
	binary.LittleEndian.PutUint32(rec[4:], 300)
	binary.LittleEndian.PutUint64(rec[8:], 4096)
	hdr := make([]byte, trace.BinaryHeaderSize)
	binary.LittleEndian.PutUint32(hdr, trace.BinaryMagic)
	binary.LittleEndian.PutUint64(hdr[8:], trace.BinaryRecordSize)
	binary.LittleEndian.PutUint32(hdr[16:], crc32c.Update(0, rec))
	for name, tc := range map[string]struct {
		data []byte
		want error
	}{
		"empty":        {nil, ErrFormat},
		"text":         {[]byte("hello"), ErrFormat},
		"path list":    {[]byte("/usr/bin/python3\n"), ErrFormat},
		"layer 300":    {append(hdr, rec...), trace.ErrInvalid},
		"bad checksum": {append(append(hdr[:16:16], make([]byte, 8)...), rec...), trace.ErrChecksum},
	} {
		if _, err := DecodeTrace(tc.data, nil); !errors.Is(err, tc.want) {
			t.Errorf("%s: err %v, want %v", name, err, tc.want)
		}
	}
	if _, err := ReadTraceFile(filepath.Join(t.TempDir(), "absent"), nil); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("absent file: %v", err)
	}
}

func FuzzDecodeTrace(f *testing.F) {
	pb, _ := trace.MarshalPB(smallTrace())
	f.Add(pb)
	var bin bytes.Buffer
	trace.ToBinary(&bin, smallTrace())
	f.Add(bin.Bytes())
	layer, _ := image.BuildLayer(smallTrace(), ocispec.MediaTypeImageLayer)
	f.Add(layer.Data)
	f.Add([]byte("/etc/hosts\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		tr, err := DecodeTrace(data, nil)
		if err != nil {
			return
		}
		for i, fr := range tr.Frames {
			if fr.Layer < 0 || fr.Layer >= len(tr.Layers) || fr.Length <= 0 || fr.Offset < 0 {
				t.Fatalf("frame %d %+v out of range for %d layers", i, fr, len(tr.Layers))
			}
		}
		if _, err := EncodeTrace(tr, FormatOBD); err != nil {
			t.Fatalf("a decoded trace does not encode as binary: %v", err)
		}
	})
}
