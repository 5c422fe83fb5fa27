package trace

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// synthTrace builds a start-up-like trace of n frames, deterministic for a seed. It models what
// the recorder sees on an image's block device: files read front to back as a run of readahead
// requests growing from 4 KiB to 128 KiB; each new file usually a little past the previous one
// in its layer (ext4 allocates a directory's files together) and otherwise anywhere in the layer
// (a back-jump); a second file read concurrently 20% of the time, so layers interleave;
// requests a few tens of µs apart within a file, hundreds between files, and rare pauses of tens
// of ms while the application computes. Times are ns, as the kernel gives them.
func synthTrace(n int, seed uint64) *Trace {
	r := rand.New(rand.NewPCG(seed, 0x0bd))
	sizes := []int64{64 << 20, 80 << 20, 30 << 20, 5 << 20, 1 << 20, 256 << 10}
	weights := []float64{0.15, 0.45, 0.2, 0.1, 0.07, 0.03}
	t := &Trace{Meta: Meta{Source: SourceCLI, Runs: 1}}
	for i := range sizes {
		t.Layers = append(t.Layers, Layer{
			Digest:    digest.FromString(fmt.Sprint("layer", i)),
			Size:      sizes[i] / 2,
			MediaType: "application/vnd.oci.image.layer.v1.tar",
		})
	}
	type file struct {
		layer     int
		off, next int64 // next: readahead size of the next request
		left      int   // requests left
	}
	cursor := make([]int64, len(sizes)) // furthest byte read per layer
	open := func() file {
		x, l := r.Float64(), 0
		for l < len(weights)-1 && x >= weights[l] {
			x -= weights[l]
			l++
		}
		blocks := sizes[l] / 4096
		off := cursor[l] + int64(r.ExpFloat64()*64)*4096
		if r.Float64() < 0.2 || off >= sizes[l] {
			off = r.Int64N(blocks) * 4096
		}
		return file{layer: l, off: off, next: 4096 << r.IntN(3), left: 1 + int(r.ExpFloat64()*3)}
	}
	files := [2]file{open(), open()}
	var now int64
	for len(t.Frames) < n {
		f := &files[0]
		if r.Float64() < 0.2 {
			f = &files[1]
		}
		t.Frames = append(t.Frames, Frame{Layer: f.layer, Offset: f.off, Length: f.next, TimeNS: now})
		f.off += f.next
		cursor[f.layer] = max(cursor[f.layer], f.off)
		f.next = min(2*f.next, 128<<10)
		if f.left--; f.left > 0 {
			now += int64(r.ExpFloat64() * 40e3)
		} else {
			*f = open()
			now += int64(r.ExpFloat64() * 400e3)
		}
		if r.Float64() < 0.002 {
			now += int64(r.ExpFloat64() * 50e6)
		}
	}
	t.Meta.Duration = time.Duration(now)
	return t
}

// TestPBBytesPerFrame holds trace.pb to its size target on a realistic trace.
func TestPBBytesPerFrame(t *testing.T) {
	const n = 20000
	tr := synthTrace(n, 1)
	if d := tr.Meta.Duration; d < time.Second || d > 10*time.Second {
		t.Fatalf("synthetic trace spans %v, want a few seconds", d)
	}
	b, err := MarshalPB(tr)
	if err != nil {
		t.Fatal(err)
	}
	perFrame := float64(len(b)) / n
	t.Logf("%d frames in %d bytes: %.2f bytes/frame (binary form: %d bytes/frame)",
		n, len(b), perFrame, BinaryRecordSize)
	if perFrame > 4 {
		t.Errorf("trace.pb takes %.2f bytes/frame, target <= 4", perFrame)
	}
}

func BenchmarkMarshalPB(b *testing.B) {
	tr := synthTrace(20000, 1)
	var size int
	for b.Loop() {
		buf, err := MarshalPB(tr)
		if err != nil {
			b.Fatal(err)
		}
		size = len(buf)
	}
	b.ReportMetric(float64(size)/float64(len(tr.Frames)), "bytes/frame")
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(tr.Frames)), "ns/frame")
}

func BenchmarkUnmarshalPB(b *testing.B) {
	tr := synthTrace(20000, 1)
	buf, err := MarshalPB(tr)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		if _, err := UnmarshalPB(buf); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(tr.Frames)), "ns/frame")
}
