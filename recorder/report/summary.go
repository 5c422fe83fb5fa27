// Package report describes a trace for people: a summary (frames, bytes and unique bytes per
// layer, the time span of the first accesses) as text or JSON, and a PNG chart of where in
// each layer the reads went over time and how the bytes to prefetch accumulate.
package report

import (
	"cmp"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/obdtrace/obdtrace/trace"
)

// LayerSummary describes the frames of one layer.
type LayerSummary struct {
	Layer  int           `json:"layer"`
	Digest digest.Digest `json:"digest,omitempty"`
	Size   int64         `json:"size,omitempty"`
	Frames int           `json:"frames"`
	// Bytes is the sum of frame lengths; UniqueBytes counts bytes covered by several frames
	// once (the two differ only for traces that were not deduplicated, such as upstream's).
	Bytes       int64 `json:"bytes"`
	UniqueBytes int64 `json:"unique_bytes"`
}

// Summary describes a trace.
type Summary struct {
	Frames      int            `json:"frames"`
	Bytes       int64          `json:"bytes"`
	UniqueBytes int64          `json:"unique_bytes"`
	Layers      []LayerSummary `json:"layers"`
	// Timed is false when every frame has time 0 (a trace from upstream's binary format):
	// frame order is then the only timing.
	Timed bool `json:"timed"`
	// FirstNS and LastNS bound the frames' first-access times.
	FirstNS int64 `json:"first_ns"`
	LastNS  int64 `json:"last_ns"`
	// MaxFrameLength and MedianFrameLength describe frame sizes in bytes.
	MedianFrameLength int64       `json:"median_frame_length"`
	MaxFrameLength    int64       `json:"max_frame_length"`
	Meta              MetaSummary `json:"meta"`
}

// MetaSummary is trace.Meta in readable units.
type MetaSummary struct {
	Source          string     `json:"source"`
	Runs            int        `json:"runs"`
	Start           *time.Time `json:"start,omitempty"`
	DurationNS      int64      `json:"duration_ns"`
	KernelRelease   string     `json:"kernel_release,omitempty"`
	RecorderVersion string     `json:"recorder_version,omitempty"`
	ImageRef        string     `json:"image_ref,omitempty"`
	ManifestDigest  string     `json:"manifest_digest,omitempty"`
}

func summarizeMeta(m trace.Meta) MetaSummary {
	s := MetaSummary{
		Source: m.Source.String(), Runs: m.Runs, DurationNS: int64(m.Duration), KernelRelease: m.KernelRelease,
		RecorderVersion: m.RecorderVersion, ImageRef: m.ImageRef, ManifestDigest: string(m.ManifestDigest),
	}
	if !m.Start.IsZero() {
		start := m.Start.UTC()
		s.Start = &start
	}
	return s
}

// Summarize computes t's summary.
func Summarize(t *trace.Trace) *Summary {
	s := &Summary{Frames: len(t.Frames), Meta: summarizeMeta(t.Meta), Layers: make([]LayerSummary, len(t.Layers))}
	for i, l := range t.Layers {
		s.Layers[i] = LayerSummary{Layer: i, Digest: l.Digest, Size: l.Size}
	}
	byLayer := make([][]trace.Frame, len(t.Layers))
	lengths := make([]int64, 0, len(t.Frames))
	for i, f := range t.Frames {
		if f.Layer < 0 || f.Layer >= len(t.Layers) { // only a trace that skipped Validate
			continue
		}
		ls := &s.Layers[f.Layer]
		ls.Frames++
		ls.Bytes += f.Length
		s.Bytes += f.Length
		byLayer[f.Layer] = append(byLayer[f.Layer], f)
		lengths = append(lengths, f.Length)
		if i == 0 || f.TimeNS < s.FirstNS {
			s.FirstNS = f.TimeNS
		}
		s.LastNS = max(s.LastNS, f.TimeNS)
		s.Timed = s.Timed || f.TimeNS != 0
	}
	for i, fs := range byLayer {
		s.Layers[i].UniqueBytes = unionLength(fs)
		s.UniqueBytes += s.Layers[i].UniqueBytes
	}
	if len(lengths) > 0 {
		slices.Sort(lengths)
		s.MedianFrameLength = lengths[len(lengths)/2]
		s.MaxFrameLength = lengths[len(lengths)-1]
	}
	return s
}

// unionLength is the number of bytes the frames cover; it sorts fs.
func unionLength(fs []trace.Frame) int64 {
	slices.SortFunc(fs, func(a, b trace.Frame) int { return cmp.Compare(a.Offset, b.Offset) })
	var n, end int64
	for _, f := range fs {
		start := max(f.Offset, end)
		if f.End() > start {
			n += f.End() - start
			end = f.End()
		}
	}
	return n
}

// WriteText writes the summary as aligned text.
func (s *Summary) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "frames:\t%d\n", s.Frames)
	fmt.Fprintf(tw, "bytes:\t%s (%s unique)\n", FormatBytes(s.Bytes), FormatBytes(s.UniqueBytes))
	if s.Timed {
		fmt.Fprintf(tw, "first accesses:\t%v .. %v (span %v)\n", time.Duration(s.FirstNS), time.Duration(s.LastNS),
			time.Duration(s.LastNS-s.FirstNS))
	} else {
		fmt.Fprintf(tw, "first accesses:\tuntimed (upstream binary trace): order only\n")
	}
	fmt.Fprintf(tw, "frame length:\tmedian %s, max %s\n", FormatBytes(s.MedianFrameLength), FormatBytes(s.MaxFrameLength))
	m := s.Meta
	var meta []string
	for _, kv := range [][2]string{
		{"source", m.Source}, {"runs", fmt.Sprint(m.Runs)}, {"duration", time.Duration(m.DurationNS).String()},
		{"image", m.ImageRef}, {"manifest", m.ManifestDigest}, {"kernel", m.KernelRelease},
		{"recorder", m.RecorderVersion},
	} {
		if kv[1] != "" && kv[1] != "0" && kv[1] != "0s" && kv[1] != trace.SourceUnspecified.String() {
			meta = append(meta, kv[0]+"="+kv[1])
		}
	}
	if m.Start != nil {
		meta = append(meta, "start="+m.Start.Format(time.RFC3339))
	}
	fmt.Fprintf(tw, "meta:\t%s\n", strings.Join(meta, " "))
	fmt.Fprintf(tw, "\nlayer\tframes\tbytes\tunique\tlayer size\tdigest\n")
	for _, l := range s.Layers {
		size := "-"
		if l.Size > 0 {
			size = FormatBytes(l.Size)
		}
		fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%s\t%s\n", l.Layer, l.Frames, FormatBytes(l.Bytes), FormatBytes(l.UniqueBytes), size, l.Digest)
	}
	return tw.Flush()
}

// FormatBytes formats n with a binary unit: 512 B, 4.0 KiB, 1.5 MiB.
func FormatBytes(n int64) string {
	const unit = 1024
	if n < unit && n > -unit {
		return fmt.Sprintf("%d B", n)
	}
	f, i := float64(n), 0
	for ; (f >= unit || f <= -unit) && i < 6; i++ {
		f /= unit
	}
	return fmt.Sprintf("%.1f %ciB", f, "KMGTPE"[i-1])
}
