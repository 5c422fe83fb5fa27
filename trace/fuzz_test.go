package trace

import (
	"bytes"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// The seeds below run as plain unit tests; `go test -fuzz FuzzX ./trace` explores further.

func FuzzReadBinary(f *testing.F) {
	golden, err := os.ReadFile(goldenPath)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(golden)
	f.Add(golden[:BinaryHeaderSize])
	f.Add(golden[:len(golden)-5])
	f.Add(binaryFile(record('W', 1, 4096, 0), record('R', 7, 1<<40, 1<<62)))
	f.Add(binaryFile(record('R', 0, 1<<63, 1)))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		frames, err := ReadBinary(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			if frames != nil {
				t.Fatal("frames returned with an error")
			}
			return
		}
		if len(frames) > (len(data)-BinaryHeaderSize)/BinaryRecordSize {
			t.Fatalf("%d frames from %d bytes", len(frames), len(data))
		}
		for i, fr := range frames {
			if err := fr.validate(1 << 32); err != nil {
				t.Fatalf("frame %d accepted but invalid: %v", i, err)
			}
		}
		// What was read must write back and read back as the same ranges.
		var buf bytes.Buffer
		if err := WriteBinary(&buf, frames); err != nil {
			t.Fatalf("frames read cannot be written: %v", err)
		}
		again, err := ReadBinary(&buf, 0)
		if err != nil {
			t.Fatalf("rewritten trace unreadable: %v", err)
		}
		if !slices.Equal(again, splitFrames(frames)) {
			t.Fatal("rewritten trace reads back differently")
		}
	})
}

func FuzzUnmarshalPB(f *testing.F) {
	for _, tr := range []*Trace{{}, sampleTrace(), synthTrace(200, 9)} {
		b, err := MarshalPB(tr)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(pbPrefix))
	f.Add([]byte("\x0a\x0bobdtrace.v1\x22\x08\x1a\x02\x03\x00\x22\x02\x01\x00"))
	f.Fuzz(func(t *testing.T, data []byte) {
		tr, err := UnmarshalPB(data)
		if err != nil {
			if tr != nil {
				t.Fatal("trace returned with an error")
			}
			return
		}
		if err := tr.Validate(); err != nil {
			t.Fatalf("decoded trace is invalid: %v", err)
		}
		b, err := MarshalPB(tr)
		if err != nil {
			t.Fatalf("decoded trace cannot be encoded: %v", err)
		}
		again, err := UnmarshalPB(b)
		if err != nil {
			t.Fatalf("re-encoded trace unreadable: %v", err)
		}
		// The input may carry finer times than this encoder keeps.
		for i := range tr.Frames {
			tr.Frames[i].TimeNS -= tr.Frames[i].TimeNS % int64(TimeResolution)
		}
		if !reflect.DeepEqual(again, tr) {
			t.Fatalf("re-encoded trace differs:\n got %+v\nwant %+v", again, tr)
		}
	})
}

func FuzzParsePathList(f *testing.F) {
	f.Add([]byte("/usr/lib/python3/\n/usr/bin/python3\n"))
	f.Add([]byte("\r\n  /etc//hosts \n/\n"))
	f.Add([]byte("relative\n"))
	f.Add([]byte("/a/../b"))
	f.Add([]byte("/\xff\x00"))
	f.Fuzz(func(t *testing.T, data []byte) {
		paths, err := ParsePathList(data)
		if err != nil {
			if paths != nil {
				t.Fatal("paths returned with an error")
			}
			return
		}
		for _, p := range paths {
			if !strings.HasPrefix(p, "/") || strings.Contains(p, "//") || strings.ContainsAny(p, "\n\x00") {
				t.Fatalf("accepted path %q is not a clean absolute path", p)
			}
		}
		// Parsing is idempotent on its own output, and agrees with Detect.
		joined := []byte(strings.Join(paths, "\n"))
		again, err := ParsePathList(joined)
		if err != nil || !reflect.DeepEqual(again, paths) && len(paths) > 0 {
			t.Fatalf("reparsing %q gives %q, %v", joined, again, err)
		}
		if len(paths) > 0 && Detect(joined) != KindPathList {
			t.Fatalf("Detect(%q) = %v, want path list", joined, Detect(joined))
		}
	})
}
