package record

import (
	"fmt"
	"io"
	"text/tabwriter"
)

// WriteText prints the summary for people: what was recorded and for how
// long, the trace (frames, bytes and unique bytes per layer), lost events
// and the image created.
func (s *Summary) WriteText(w io.Writer) error {
	lost := "unknown (the snapshotter did not report it)"
	if s.Lost != nil {
		lost = fmt.Sprint(*s.Lost)
	}
	replaced := "none"
	if s.Replaced != nil {
		replaced = s.Replaced.Digest.String()
	}
	pushed := "no"
	if s.Pushed {
		pushed = "yes"
	}
	if _, err := fmt.Fprintf(w, "recorded %s for %v (%s, exit code %d); lost events: %s\n",
		s.Image, roundDuration(s.Recorded), s.Stopped, s.ExitCode, lost); err != nil {
		return err
	}
	if s.Trace != nil {
		if err := s.Trace.WriteText(w); err != nil {
			return err
		}
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "\nnew image:\t%s\nmanifest:\t%s\ntrace layer:\t%s (%d bytes)\nold trace layer:\t%s\npushed:\t%s\n",
		s.NewImage, s.Manifest.Digest, s.Layer.Digest, s.Layer.Size, replaced, pushed)
	return tw.Flush()
}
