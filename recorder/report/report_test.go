package report

import (
	"bytes"
	"encoding/json"
	"fmt"
	"image"
	"image/png"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/obdtrace/obdtrace/trace"
)

// startupTrace looks like a recorded start-up: sequential runs in three layers over 2.5 s.
func startupTrace() *trace.Trace {
	rng := rand.New(rand.NewPCG(1, 1))
	t := &trace.Trace{Meta: trace.Meta{Source: trace.SourceCLI, Runs: 1, Duration: 3 * time.Second, ImageRef: "example/app:1"}}
	for i, size := range []int64{64 << 20, 300 << 20, 12 << 20} {
		t.Layers = append(t.Layers, trace.Layer{Digest: digest.Digest(fmt.Sprintf("sha256:%02x%062x", i*40+17, i)), Size: size})
	}
	var now int64
	for len(t.Frames) < 2000 {
		l := rng.IntN(3)
		off := rng.Int64N(t.Layers[l].Size/2) &^ 4095
		for range 1 + rng.IntN(20) {
			n := int64(4096 * (1 + rng.IntN(32)))
			now += rng.Int64N(2_500_000)
			t.Frames = append(t.Frames, trace.Frame{Layer: l, Offset: off, Length: n, TimeNS: now})
			off += n + int64(rng.IntN(3))*4096
		}
	}
	return t
}

func TestSummarize(t *testing.T) {
	tr := &trace.Trace{
		Layers: []trace.Layer{{Digest: digest.FromString("a"), Size: 100}, {Digest: digest.FromString("b")}},
		Frames: []trace.Frame{
			{Layer: 0, Offset: 0, Length: 4096, TimeNS: 50},
			{Layer: 1, Offset: 8192, Length: 4096, TimeNS: 70},
			{Layer: 0, Offset: 2048, Length: 4096, TimeNS: 20}, // overlaps the first
			{Layer: 0, Offset: 1 << 20, Length: 512, TimeNS: 90},
		},
	}
	s := Summarize(tr)
	if s.Frames != 4 || s.Bytes != 3*4096+512 || s.UniqueBytes != 6144+4096+512 || !s.Timed ||
		s.FirstNS != 20 || s.LastNS != 90 || s.MaxFrameLength != 4096 || s.MedianFrameLength != 4096 {
		t.Errorf("summary %+v", s)
	}
	if l := s.Layers[0]; l.Frames != 3 || l.Bytes != 2*4096+512 || l.UniqueBytes != 6144+512 || l.Size != 100 {
		t.Errorf("layer 0 %+v", l)
	}
	if l := s.Layers[1]; l.Frames != 1 || l.UniqueBytes != 4096 || l.Digest != tr.Layers[1].Digest {
		t.Errorf("layer 1 %+v", l)
	}
	var text bytes.Buffer
	if err := s.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"frames:", "12.5 KiB (10.5 KiB unique)", "span 70ns", tr.Layers[1].Digest.String()} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text lacks %q:\n%s", want, text.String())
		}
	}
	if _, err := json.Marshal(s); err != nil {
		t.Error(err)
	}
	for i := range tr.Frames {
		tr.Frames[i].TimeNS = 0
	}
	if s := Summarize(tr); s.Timed {
		t.Error("an untimed trace summarised as timed")
	}
}

func TestFormatBytes(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 4096: "4.0 KiB", 3 << 29: "1.5 GiB"} {
		if got := FormatBytes(n); got != want {
			t.Errorf("FormatBytes(%d) = %q, want %q", n, got, want)
		}
	}
	for v, want := range map[float64]string{0: "0", 512: "512B", 64 << 10: "64K", 3 << 19: "1.5M"} {
		if got := FormatBytesShort(v); got != want {
			t.Errorf("FormatBytesShort(%v) = %q, want %q", v, got, want)
		}
	}
}

func TestPlot(t *testing.T) {
	tr := startupTrace()
	var buf bytes.Buffer
	if err := WritePNG(&buf, tr, PlotOptions{}); err != nil {
		t.Fatal(err)
	}
	if path := os.Getenv("OBD_PLOT_OUT"); path != "" { // to look at it
		os.WriteFile(path, buf.Bytes(), 0o644)
	}
	img, err := png.Decode(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if b := img.Bounds(); b.Dx() != defaultWidth || b.Dy() != defaultHeight {
		t.Fatalf("size %v", b)
	}
	// Every layer's colour appears in the chart, beyond its legend swatch.
	for l := range tr.Layers {
		if n := countColor(img, palette[l]); n < 500 {
			t.Errorf("layer %d: %d pixels of its colour", l, n)
		}
	}
	// Degenerate traces draw without trouble.
	for _, tt := range []*trace.Trace{{}, {Layers: tr.Layers[:1], Frames: []trace.Frame{{Length: 1}}}} {
		if img := Plot(tt, PlotOptions{Width: 10, Height: 10}); img.Bounds().Dx() != minWidth {
			t.Errorf("tiny plot %v", img.Bounds())
		}
	}
}

func countColor(img image.Image, c interface{ RGBA() (r, g, b, a uint32) }) int {
	r0, g0, b0, _ := c.RGBA()
	n := 0
	for y := img.Bounds().Min.Y; y < img.Bounds().Max.Y; y++ {
		for x := img.Bounds().Min.X; x < img.Bounds().Max.X; x++ {
			if r, g, b, _ := img.At(x, y).RGBA(); r == r0 && g == g0 && b == b0 {
				n++
			}
		}
	}
	return n
}
