// Package jsonl writes captured block events as JSON lines, one object per
// event, for `obd-recorder capture`: the encoding, the copy loop from a
// capture, and an output file that only appears once complete.
//
// The encoding is hand-rolled with strconv appends into a reused buffer:
// capture must stay under 0.5 s of CPU per million events, and reflection-
// based encoding/json alone would spend most of that.
package jsonl

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"unicode/utf8"

	"github.com/obdtrace/obdtrace/bpf"
)

// AppendEvent appends ev to b as one JSON object followed by a newline.
//
// Issue events carry ts_ns, dev ("major:minor"), sector, sectors, op (the
// comma-joined flags, e.g. "read,readahead"), pid, comm and cgroup_id.
// Completion events carry "event":"complete", the same request fields, and
// latency_ns and status instead of the task fields, which at completion
// describe an interrupt or kworker rather than the reader.
func AppendEvent(b []byte, ev *bpf.Event) []byte {
	if ev.Kind == bpf.KindComplete {
		b = append(b, `{"event":"complete","ts_ns":`...)
	} else {
		b = append(b, `{"ts_ns":`...)
	}
	b = strconv.AppendUint(b, ev.Timestamp, 10)
	b = append(b, `,"dev":"`...)
	b, _ = ev.Dev.AppendText(b) // never fails
	b = append(b, `","sector":`...)
	b = strconv.AppendUint(b, ev.Sector, 10)
	b = append(b, `,"sectors":`...)
	b = strconv.AppendUint(b, uint64(ev.Sectors), 10)
	b = append(b, `,"op":"`...)
	b, _ = ev.Op.AppendText(b)
	if ev.Kind == bpf.KindComplete {
		b = append(b, `","latency_ns":`...)
		b = strconv.AppendInt(b, int64(ev.Latency), 10)
		b = append(b, `,"status":`...)
		b = strconv.AppendInt(b, int64(ev.Status), 10)
		return append(b, "}\n"...)
	}
	b = append(b, `","pid":`...)
	b = strconv.AppendUint(b, uint64(ev.PID), 10)
	b = append(b, `,"comm":`...)
	b = appendString(b, commBytes(&ev.Comm))
	b = append(b, `,"cgroup_id":`...)
	b = strconv.AppendUint(b, ev.CgroupID, 10)
	return append(b, "}\n"...)
}

func commBytes(c *[16]byte) []byte {
	for i, ch := range c {
		if ch == 0 {
			return c[:i]
		}
	}
	return c[:]
}

// appendString appends s as a JSON string. A task can name itself anything
// (prctl PR_SET_NAME), so quotes, control bytes and invalid UTF-8 must be
// escaped; the latter becomes U+FFFD, as encoding/json does.
func appendString(b, s []byte) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	plain := 0 // nearly every name is plain ASCII: one append
	for plain < len(s) && s[plain] >= 0x20 && s[plain] < utf8.RuneSelf && s[plain] != '"' && s[plain] != '\\' {
		plain++
	}
	b = append(b, s[:plain]...)
	for i := plain; i < len(s); {
		c := s[i]
		if c >= 0x20 && c < utf8.RuneSelf && c != '"' && c != '\\' {
			b = append(b, c)
			i++
			continue
		}
		if c < utf8.RuneSelf {
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\t':
				b = append(b, '\\', 't')
			case '\r':
				b = append(b, '\\', 'r')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			continue
		}
		r, size := utf8.DecodeRune(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, `\ufffd`...)
		} else {
			b = append(b, s[i:i+size]...)
		}
		i += size
	}
	return append(b, '"')
}

// Writer encodes events onto a buffered io.Writer.
type Writer struct {
	bw *bufio.Writer
	n  int64
}

// NewWriter returns a Writer with a buffer large enough that, at a few
// hundred thousand events a second, writes cost few syscalls.
func NewWriter(w io.Writer) *Writer {
	return &Writer{bw: bufio.NewWriterSize(w, 256<<10)}
}

// Write encodes one event.
func (w *Writer) Write(ev *bpf.Event) error {
	// Encoding straight into bufio's free space saves a copy; Write then
	// only advances its cursor (or flushes when the event did not fit).
	b := AppendEvent(w.bw.AvailableBuffer(), ev)
	if _, err := w.bw.Write(b); err != nil {
		return fmt.Errorf("jsonl: write event: %w", err)
	}
	w.n++
	return nil
}

// Flush writes out buffered events.
func (w *Writer) Flush() error {
	if err := w.bw.Flush(); err != nil {
		return fmt.Errorf("jsonl: flush: %w", err)
	}
	return nil
}

// Count returns the number of events written.
func (w *Writer) Count() int64 { return w.n }

// Source yields events; *bpf.Capture is one.
type Source interface {
	Read(ctx context.Context, ev *bpf.Event) error
}

// Copy writes each event from src to w until src returns io.EOF (for a
// capture: it was detached and its ring drained), then flushes. It returns
// the number of events written. A ctx that ends stops Copy with ctx.Err()
// after a flush; to stop without losing buffered events, detach the capture
// instead and let Copy reach io.EOF.
func Copy(ctx context.Context, w io.Writer, src Source) (int64, error) {
	jw := NewWriter(w)
	var ev bpf.Event
	for {
		err := src.Read(ctx, &ev)
		if errors.Is(err, io.EOF) {
			return jw.Count(), jw.Flush()
		}
		if err != nil {
			return jw.Count(), errors.Join(err, jw.Flush())
		}
		if err := jw.Write(&ev); err != nil {
			return jw.Count(), err
		}
	}
}
