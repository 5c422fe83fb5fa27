package image

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/trace"
)

// sampleTrace is a two-layer trace of n frames; seed varies its frames.
func sampleTrace(n, seed int) *trace.Trace {
	t := &trace.Trace{
		Layers: []trace.Layer{
			{Digest: digest.Digest(fmt.Sprintf("sha256:%064x", 1)), Size: 1 << 20, MediaType: ocispec.MediaTypeImageLayer},
			{Digest: digest.Digest(fmt.Sprintf("sha256:%064x", 2)), Size: 2 << 20, MediaType: ocispec.MediaTypeImageLayer},
		},
		Meta: trace.Meta{Source: trace.SourceCLI, Runs: 1, Duration: 3 * time.Second, RecorderVersion: "test"},
	}
	for i := range n {
		t.Frames = append(t.Frames, trace.Frame{
			Layer: i % 2, Offset: int64(4096 + (i*seed)%64*4096), Length: 4096 * int64(1+i%3), TimeNS: int64(i) * 1000,
		})
	}
	return t
}

func TestBuildLayerDeterministic(t *testing.T) {
	a, err := BuildLayer(sampleTrace(50, 7), ocispec.MediaTypeImageLayer)
	if err != nil {
		t.Fatal(err)
	}
	b, err := BuildLayer(sampleTrace(50, 7), ocispec.MediaTypeImageLayer)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Data, b.Data) || a.Desc.Digest != b.Desc.Digest {
		t.Fatal("the same trace gave different layers")
	}
	c, err := BuildLayer(sampleTrace(50, 11), ocispec.MediaTypeImageLayer)
	if err != nil {
		t.Fatal(err)
	}
	if c.Desc.Digest == a.Desc.Digest {
		t.Fatal("different traces gave the same layer")
	}
	want := map[string]string{
		AnnotationAcceleration: "yes",
		AnnotationBlobDigest:   a.Desc.Digest.String(),
		AnnotationBlobSize:     fmt.Sprint(len(a.Data)),
		AnnotationVersion:      "0.1.0",
	}
	if !reflect.DeepEqual(a.Desc.Annotations, want) || a.Desc.Size != int64(len(a.Data)) ||
		a.Desc.Digest != digest.FromBytes(a.Data) || a.Desc.MediaType != ocispec.MediaTypeImageLayer {
		t.Errorf("descriptor %+v", a.Desc)
	}
	if !IsTraceLayer(a.Desc) {
		t.Error("IsTraceLayer(built layer) = false")
	}
}

func TestBuildLayerTarHeaders(t *testing.T) {
	l, err := BuildLayer(sampleTrace(10, 3), MediaTypeDockerLayer)
	if err != nil {
		t.Fatal(err)
	}
	if l.Desc.MediaType != MediaTypeDockerLayer {
		t.Errorf("media type %q", l.Desc.MediaType)
	}
	tr := tar.NewReader(bytes.NewReader(l.Data))
	var names []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		if h.Mode != 0o444 || h.Uid != 0 || h.Gid != 0 || h.Uname != "" || h.Gname != "" ||
			h.ModTime.Unix() != 0 || h.Typeflag != tar.TypeReg || h.Format != tar.FormatUSTAR {
			t.Errorf("%s: header %+v", h.Name, h)
		}
		data, _ := io.ReadAll(tr)
		switch h.Name {
		case FileUpstream:
			frames, err := trace.ReadBinary(bytes.NewReader(data), int64(len(data)))
			if err != nil || len(frames) != 10 {
				t.Errorf("%s: %d frames, %v", FileUpstream, len(frames), err)
			}
		case FilePB:
			if _, err := trace.UnmarshalPB(data); err != nil {
				t.Errorf("%s: %v", FilePB, err)
			}
		}
	}
	if !reflect.DeepEqual(names, []string{FileUpstream, FilePB}) {
		t.Errorf("entries %q, want [trace trace.pb]", names)
	}
	if _, err := BuildLayer(sampleTrace(1, 1), ocispec.MediaTypeImageLayerGzip); !errors.Is(err, ErrUnsupported) {
		t.Errorf("gzip media type: err %v, want ErrUnsupported", err)
	}
}

func TestReadLayerRoundTrip(t *testing.T) {
	want := sampleTrace(100, 5)
	l, err := BuildLayer(want, ocispec.MediaTypeImageLayer)
	if err != nil {
		t.Fatal(err)
	}
	got, err := ReadLayer(bytes.NewReader(l.Data), nil)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("read back %+v\nwant %+v", got, want)
	}
}

// tarOf builds a tar of name/content pairs.
func tarOf(t *testing.T, files ...string) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for i := 0; i+1 < len(files); i += 2 {
		if err := tw.WriteHeader(&tar.Header{Name: files[i], Mode: 0o644, Size: int64(len(files[i+1])), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		tw.Write([]byte(files[i+1]))
	}
	tw.Close()
	return buf.Bytes()
}

func TestReadLayerUpstream(t *testing.T) {
	src := sampleTrace(20, 3)
	var bin bytes.Buffer
	if err := trace.ToBinary(&bin, src); err != nil {
		t.Fatal(err)
	}
	layer := tarOf(t, "./etc/other", "x", "./trace", bin.String())
	got, err := ReadLayer(bytes.NewReader(layer), src.Layers)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Frames) != 20 || got.Meta.Source != trace.SourceUpstream || got.Frames[3].Offset != src.Frames[3].Offset ||
		got.Frames[3].TimeNS != 0 {
		t.Errorf("upstream layer read as %+v", got)
	}
	if _, err := ReadLayer(bytes.NewReader(layer), src.Layers[:1]); !errors.Is(err, trace.ErrInvalid) {
		t.Errorf("frames naming a missing layer: err %v, want trace.ErrInvalid", err)
	}
}

func TestReadLayerErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		layer []byte
		want  []error
	}{
		{"empty tar", tarOf(t), []error{ErrNoTrace}},
		{"other files", tarOf(t, "hello", "world"), []error{ErrNoTrace}},
		{"path list", tarOf(t, "trace", "/usr/bin/\n/etc/passwd\n"), []error{ErrNoTrace, trace.ErrPathList}},
		{"empty trace", tarOf(t, "trace", ""), []error{ErrNoTrace}},
		{"corrupt pb", tarOf(t, "trace.pb", "\x0a\x0bobdtrace.v1\x12\xff"), []error{trace.ErrFormat}},
		{"corrupt binary", tarOf(t, "trace", "\x20\x18\xef\xc2garbage"), []error{trace.ErrTruncated}},
		{"not a tar", []byte(strings.Repeat("x", 1024)), []error{ErrLayer}},
		{"truncated tar", tarOf(t, "trace.pb", strings.Repeat("y", 3000))[:1500], []error{ErrLayer}},
	} {
		_, err := ReadLayer(bytes.NewReader(tc.layer), nil)
		for _, w := range tc.want {
			if !errors.Is(err, w) {
				t.Errorf("%s: err %v, want %v", tc.name, err, w)
			}
		}
	}
}
