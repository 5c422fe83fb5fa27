package backstore

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestParseControlRequest(t *testing.T) {
	good := []struct {
		in   string
		want ControlRequest
	}{
		{`{"op":"record","path":"/tmp/t","max_duration":1000000000}`, ControlRequest{Op: OpRecord, Path: "/tmp/t", MaxDuration: time.Second}},
		{`{"op":"stop-record","path":"/tmp/t"}`, ControlRequest{Op: OpStopRecord, Path: "/tmp/t"}},
		{" {\"op\":\"replay\",\"path\":\"/a/b.pb\"}\n", ControlRequest{Op: OpReplay, Path: "/a/b.pb"}},
	}
	for _, c := range good {
		got, err := ParseControlRequest([]byte(c.in))
		if err != nil || got != c.want {
			t.Errorf("ParseControlRequest(%s) = %+v, %v; want %+v", c.in, got, err, c.want)
		}
	}
	bad := map[string]string{
		``:                                              "EOF",
		`{"op":"record"}`:                               "no path",
		`{"op":"format","path":"/x"}`:                   "unknown op",
		`{"op":"record","path":"x"}`:                    "not absolute",
		`{"op":"record","path":"/a/../b"}`:              "not absolute and clean",
		`{"op":"record","path":"/a\u0000b"}`:            "NUL",
		`{"op":"record","path":"/a","extra":1}`:         "unknown field",
		`{"op":"record","path":"/a"}{"op":"x"}`:         "data after",
		`{"op":"record","path":"/a","max_duration":-1}`: "negative",
		`{"op":"replay","path":"/a","max_duration":5}`:  "max_duration with op",
		`[1,2]`: "cannot unmarshal",
		`{"op":"record","path":"/` + strings.Repeat("a", maxControlPath) + `"}`: "path of",
		strings.Repeat(" ", MaxControlMessage+1):                                "at most",
	}
	for in, want := range bad {
		_, err := ParseControlRequest([]byte(in))
		if !errors.Is(err, ErrControlMessage) || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseControlRequest(%.60q) = %v; want ErrControlMessage mentioning %q", in, err, want)
		}
	}
}

// FuzzParseControlRequest checks that any input either parses into a
// request that passes the checks and survives a round trip, or fails with
// ErrControlMessage.
func FuzzParseControlRequest(f *testing.F) {
	for _, s := range []string{
		`{"op":"record","path":"/tmp/t","max_duration":1000000000}`,
		`{"op":"stop-record","path":"/tmp/t"}`,
		`{"op":"replay","path":"/a/b.pb"}`,
		`{"op":"record","path":"/a","extra":1}`,
		`{"op":"replay","path":"/a/../b"}`,
		`{"op":`, `null`, `{}`, "\x00\xff",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := ParseControlRequest(data)
		if err != nil {
			if !errors.Is(err, ErrControlMessage) {
				t.Fatalf("error %v does not wrap ErrControlMessage", err)
			}
			return
		}
		if checkControlPath(req.Path) != nil || req.MaxDuration < 0 {
			t.Fatalf("accepted a bad request %+v", req)
		}
		b, err := json.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		again, err := ParseControlRequest(b)
		if err != nil || again != req {
			t.Fatalf("round trip of %+v: %+v, %v", req, again, err)
		}
	})
}

func TestParseControlResponse(t *testing.T) {
	if r, err := parseControlResponse([]byte(`{}`)); err != nil || r.Error != "" {
		t.Errorf("empty answer: %+v, %v", r, err)
	}
	if r, err := parseControlResponse([]byte(`{"error":"no","not_recording":true}`)); err != nil || !r.NotRecording {
		t.Errorf("refusal: %+v, %v", r, err)
	}
	if _, err := parseControlResponse([]byte(`{"error":1}`)); !errors.Is(err, ErrControlMessage) {
		t.Errorf("bad answer: %v", err)
	}
}

func TestControlSocketPath(t *testing.T) {
	if _, err := controlSocketPath("/run/obdtrace/mounts/0123456789abcdef"); err != nil {
		t.Errorf("short state dir: %v", err)
	}
	if _, err := controlSocketPath("/" + strings.Repeat("d", maxUnixPath)); !errors.Is(err, ErrNoControl) {
		t.Errorf("long state dir: %v, want ErrNoControl", err)
	}
}
