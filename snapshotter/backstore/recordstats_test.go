package backstore

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestReadRecordingStats(t *testing.T) {
	dir := t.TempDir()
	lost := uint64(3)
	want := RecordingStats{Lost: &lost, Frames: 10, Bytes: 40960}
	path := filepath.Join(dir, "t.ok")
	if err := writeRecordingStats(path, want); err != nil {
		t.Fatal(err)
	}
	if got, err := ReadRecordingStats(path); err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("read back %+v, %v; want %+v", got, err, want)
	}
	for name, data := range map[string]string{"empty (upstream's)": "", "blank": " \n"} {
		os.WriteFile(path, []byte(data), 0o644)
		if got, err := ReadRecordingStats(path); err != nil || got != (RecordingStats{}) {
			t.Errorf("%s: %+v, %v; want unknown stats", name, got, err)
		}
	}
	for name, data := range map[string][]byte{
		"not json":        []byte("not json"),
		"negative lost":   []byte(`{"lost":-1}`),
		"negative frames": []byte(`{"frames":-2}`),
		"array":           []byte(`[1]`),
		"too large":       append([]byte(`{"frames":1}`), bytes.Repeat([]byte(" "), MaxRecordingStatsSize)...),
	} {
		os.WriteFile(path, data, 0o644)
		if got, err := ReadRecordingStats(path); !errors.Is(err, ErrRecordingStats) {
			t.Errorf("%s: %+v, %v; want ErrRecordingStats", name, got, err)
		}
	}
	if _, err := ReadRecordingStats(filepath.Join(dir, "missing.ok")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v, want ErrNotExist", err)
	}
}

// FuzzRecordingStats feeds the .ok reader what any process able to write
// next to a trace could: it must never panic, accept only non-negative
// counts, and give back what it accepts when written again.
func FuzzRecordingStats(f *testing.F) {
	f.Add([]byte(`{"lost":0,"frames":12,"bytes":49152}`))
	f.Add([]byte(""))
	f.Add([]byte(`{"lost":18446744073709551615}`))
	f.Add([]byte(`{"frames":-1}`))
	f.Add([]byte(`{"lost":null,"extra":[1,2,3]}`))
	f.Add([]byte(`{"bytes":1e400}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := parseRecordingStats(data)
		if err != nil {
			if !errors.Is(err, ErrRecordingStats) {
				t.Fatalf("error %v does not wrap ErrRecordingStats", err)
			}
			if st != (RecordingStats{}) {
				t.Fatalf("stats %+v with an error", st)
			}
			return
		}
		if st.Frames < 0 || st.Bytes < 0 {
			t.Fatalf("accepted negative counts: %+v", st)
		}
		path := filepath.Join(t.TempDir(), "t.ok")
		if err := writeRecordingStats(path, st); err != nil {
			t.Fatal(err)
		}
		again, err := ReadRecordingStats(path)
		if err != nil || !reflect.DeepEqual(again, st) {
			t.Fatalf("%+v read back as %+v, %v", st, again, err)
		}
	})
}
