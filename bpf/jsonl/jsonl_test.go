package jsonl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"

	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/bpf"
)

// line is what a consumer decodes from one JSON line.
type line struct {
	Event     string `json:"event"`
	TsNs      uint64 `json:"ts_ns"`
	Dev       string `json:"dev"`
	Sector    uint64 `json:"sector"`
	Sectors   uint32 `json:"sectors"`
	Op        string `json:"op"`
	PID       uint32 `json:"pid"`
	Comm      string `json:"comm"`
	CgroupID  uint64 `json:"cgroup_id"`
	LatencyNs int64  `json:"latency_ns"`
	Status    int32  `json:"status"`
}

func issue(comm string) bpf.Event {
	ev := bpf.Event{Kind: bpf.KindIssue, Timestamp: 1234567890123, Dev: 7<<20 | 3, Sector: 1 << 33, Sectors: 8,
		Op: bpf.OpRead | bpf.OpReadahead, PID: 4242, TID: 4243, CgroupID: 99}
	copy(ev.Comm[:], comm)
	return ev
}

func decode(t *testing.T, b []byte) line {
	t.Helper()
	if len(b) == 0 || b[len(b)-1] != '\n' || bytes.Count(b, []byte{'\n'}) != 1 {
		t.Fatalf("not one newline-terminated line: %q", b)
	}
	var l line
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&l); err != nil {
		t.Fatalf("invalid JSON %q: %v", b, err)
	}
	return l
}

func TestAppendEventIssue(t *testing.T) {
	ev := issue("fio")
	b := AppendEvent(nil, &ev)
	want := `{"ts_ns":1234567890123,"dev":"7:3","sector":8589934592,"sectors":8,"op":"read,readahead","pid":4242,"comm":"fio","cgroup_id":99}` + "\n"
	if string(b) != want {
		t.Fatalf("got  %s\nwant %s", b, want)
	}
	decode(t, b)
}

func TestAppendEventComplete(t *testing.T) {
	ev := bpf.Event{Kind: bpf.KindComplete, Timestamp: 10, Dev: 259 << 20, Sector: 16, Sectors: 8, Op: bpf.OpRead,
		Latency: 51000, Status: -5}
	l := decode(t, AppendEvent(nil, &ev))
	want := line{Event: "complete", TsNs: 10, Dev: "259:0", Sector: 16, Sectors: 8, Op: "read", LatencyNs: 51000, Status: -5}
	if l != want {
		t.Fatalf("got %+v, want %+v", l, want)
	}
}

func TestAppendEventEscapesComm(t *testing.T) {
	for comm, want := range map[string]string{
		`a"b\c`:           `a"b\c`,
		"tab\there\n":     "tab\there\n",
		"\x01\x7f":        "\x01\x7f",
		"caf\xc3\xa9":     "café",
		"bad\xffutf8":     "bad\ufffdutf8",
		"cut\xe2\x82":     "cut\ufffd\ufffd",
		"sixteen-bytes!!": "sixteen-bytes!!",
	} {
		ev := issue(comm)
		if got := decode(t, AppendEvent(nil, &ev)).Comm; got != want {
			t.Errorf("comm %q encoded as %q, want %q", comm, got, want)
		}
	}
}

// FuzzAppendEvent: whatever a task calls itself and whatever the fields
// hold, each event is one valid JSON line that decodes to the same values.
func FuzzAppendEvent(f *testing.F) {
	f.Add([]byte("fio"), uint64(1), uint64(2), uint32(8), uint32(1), uint32(7<<20|1), false)
	f.Add([]byte("\"\\\x00\xff\x1f"), ^uint64(0), ^uint64(0), ^uint32(0), ^uint32(0), ^uint32(0), true)
	f.Fuzz(func(t *testing.T, comm []byte, ts, sector uint64, sectors, op, dev uint32, complete bool) {
		ev := bpf.Event{Timestamp: ts, Sector: sector, Sectors: sectors, Op: bpf.Op(op), Dev: bpf.Dev(dev)}
		if complete {
			ev.Kind = bpf.KindComplete
		}
		copy(ev.Comm[:], comm)
		l := decode(t, AppendEvent(nil, &ev))
		if l.TsNs != ts || l.Sector != sector || l.Sectors != sectors || l.Dev != ev.Dev.String() || l.Op != ev.Op.String() {
			t.Fatalf("decoded %+v from %+v", l, ev)
		}
		if !complete {
			want := strings.ToValidUTF8(ev.CommString(), "\ufffd")
			if utf8.ValidString(ev.CommString()) && l.Comm != want {
				t.Fatalf("comm %q decoded as %q", ev.CommString(), l.Comm)
			}
		}
	})
}

type fakeSource struct {
	evs []bpf.Event
	end error
}

func (s *fakeSource) Read(ctx context.Context, ev *bpf.Event) error {
	if len(s.evs) == 0 {
		return s.end
	}
	*ev, s.evs = s.evs[0], s.evs[1:]
	return nil
}

func TestCopy(t *testing.T) {
	src := &fakeSource{evs: []bpf.Event{issue("a"), issue("b"), issue("c")}, end: io.EOF}
	var buf bytes.Buffer
	n, err := Copy(context.Background(), &buf, src)
	if err != nil || n != 3 {
		t.Fatalf("Copy = %d, %v", n, err)
	}
	lines := strings.SplitAfter(buf.String(), "\n")
	if len(lines) != 4 || lines[3] != "" {
		t.Fatalf("got %q", buf.String())
	}
	for i, want := range []string{"a", "b", "c"} {
		if got := decode(t, []byte(lines[i])).Comm; got != want {
			t.Errorf("line %d comm %q, want %q", i, got, want)
		}
	}
	boom := errors.New("boom")
	buf.Reset()
	src = &fakeSource{evs: []bpf.Event{issue("a")}, end: boom}
	if n, err := Copy(context.Background(), &buf, src); n != 1 || !errors.Is(err, boom) || buf.Len() == 0 {
		t.Fatalf("Copy with failing source = %d, %v, %d bytes flushed; want 1, boom, the line flushed", n, err, buf.Len())
	}
}

func TestFileCommitAndAbort(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "out.jsonl")
	if err := os.WriteFile(path, []byte("old\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := CreateFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write([]byte("new\n")); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); string(b) != "old\n" {
		t.Fatalf("before Commit the path holds %q, want the old content", b)
	}
	if err := f.Commit(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); string(b) != "new\n" {
		t.Fatalf("after Commit the path holds %q", b)
	}
	if err := f.Commit(); err == nil {
		t.Error("second Commit succeeded")
	}
	g, err := CreateFile(path)
	if err != nil {
		t.Fatal(err)
	}
	g.Write([]byte("discarded\n"))
	if err := g.Abort(); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("directory holds %d entries after Abort, want only out.jsonl", len(ents))
	}
	if b, _ := os.ReadFile(path); string(b) != "new\n" {
		t.Fatalf("Abort changed the path: %q", b)
	}
	if _, err := CreateFile(filepath.Join(dir, "missing", "x")); err == nil {
		t.Error("CreateFile in a missing directory succeeded")
	}
}

// BenchmarkAppendEvent is the encoding share of the capture CPU budget
// (0.5 s per million events, i.e. 500 ns per event in all).
func BenchmarkAppendEvent(b *testing.B) {
	ev := issue("containerd-shim")
	buf := make([]byte, 0, 256)
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendEvent(buf[:0], &ev)
	}
	b.SetBytes(int64(len(buf)))
}

// BenchmarkWriter is decode + encode + buffered write per event: all the
// user-space work per event except the ring buffer read itself.
func BenchmarkWriter(b *testing.B) {
	raw := make([]byte, 80)
	raw[0], raw[32], raw[36], raw[48] = 1, 3, 8, 1
	copy(raw[64:], "fio")
	w := NewWriter(io.Discard)
	var ev bpf.Event
	b.ReportAllocs()
	for b.Loop() {
		if err := ev.UnmarshalBinary(raw); err != nil {
			b.Fatal(err)
		}
		if err := w.Write(&ev); err != nil {
			b.Fatal(err)
		}
	}
}

// Renaming over a device node would replace the device with a regular file
// (as it would /dev/null). The node here is a private copy of /dev/null, so
// a regression cannot break the machine's.
func TestFileDeviceNode(t *testing.T) {
	node := filepath.Join(t.TempDir(), "null")
	if err := unix.Mknod(node, unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err != nil {
		t.Skipf("cannot create a device node (needs root): %v", err)
	}
	if probe, err := os.OpenFile(node, os.O_WRONLY, 0); err != nil {
		t.Skipf("device nodes unusable here (nodev mount?): %v", err)
	} else {
		probe.Close()
	}
	f, err := CreateFile(node)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write([]byte("x\n")); err != nil {
		t.Fatal(err)
	}
	if err := f.Commit(); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(node); err != nil || st.Mode()&os.ModeCharDevice == 0 {
		t.Fatalf("device node after Commit: %v, %v", st.Mode(), err)
	}
	if _, err := CreateFile(t.TempDir()); err == nil {
		t.Error("CreateFile on a directory succeeded")
	}
}
