package logging

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestNew(t *testing.T) {
	var buf bytes.Buffer
	log, err := New(Options{Level: "warn", Format: "json", Out: &buf})
	if err != nil {
		t.Fatal(err)
	}
	log.Info().Msg("hidden")
	log.Warn().Str("k", "v").Msg("shown")
	var rec map[string]any
	if err := json.Unmarshal(bytes.TrimSpace(buf.Bytes()), &rec); err != nil {
		t.Fatalf("not one JSON line: %q: %v", buf.String(), err)
	}
	if rec["message"] != "shown" || rec["k"] != "v" {
		t.Fatalf("record %v", rec)
	}
	buf.Reset()
	if log, err = New(Options{Format: "console", Out: &buf}); err != nil {
		t.Fatal(err)
	}
	log.Info().Msg("hello")
	if !strings.Contains(buf.String(), "hello") || strings.HasPrefix(buf.String(), "{") {
		t.Fatalf("console output %q", buf.String())
	}
	if _, err := New(Options{Level: "loud"}); err == nil {
		t.Error("bad level accepted")
	}
	if _, err := New(Options{Format: "xml"}); err == nil {
		t.Error("bad format accepted")
	}
}
