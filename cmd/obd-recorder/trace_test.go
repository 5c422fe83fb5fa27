package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/recorder"
	"github.com/obdtrace/obdtrace/recorder/image"
	"github.com/obdtrace/obdtrace/recorder/report"
	regclient "github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
	"github.com/obdtrace/obdtrace/trace"
)

// runTrace runs `trace ARGS...` in process and returns stdout and stderr.
func runTrace(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	cmd := newTraceCommand()
	var out, errOut bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SetArgs(args)
	cmd.SilenceUsage = true
	err := cmd.Execute()
	return out.String(), errOut.String(), err
}

func TestTraceConvertAndInspect(t *testing.T) {
	dir := t.TempDir()
	layers := []trace.Layer{
		{Digest: digest.Digest(fmt.Sprintf("sha256:%064x", 1))},
		{Digest: digest.Digest(fmt.Sprintf("sha256:%064x", 2))},
	}
	src := &trace.Trace{Layers: layers, Meta: trace.Meta{Runs: 1}, Frames: []trace.Frame{
		{Layer: 0, Offset: 4096, Length: 8192, TimeNS: 1_000_000},
		{Layer: 1, Offset: 0, Length: 4096, TimeNS: 2_000_000},
	}}
	pb := filepath.Join(dir, "in.pb")
	if err := recorder.WriteTraceFile(pb, src, recorder.FormatPB); err != nil {
		t.Fatal(err)
	}
	obd := filepath.Join(dir, "out.obd")
	if _, stderr, err := runTrace(t, "convert", "--to", "obd", pb, obd); err != nil || !strings.Contains(stderr, "wrote 2 frames") {
		t.Fatalf("convert to obd: %v, %q", err, stderr)
	}
	back := filepath.Join(dir, "back.pb")
	if _, _, err := runTrace(t, "convert", "--to", "pb", obd, back); err == nil {
		t.Fatal("binary to pb without --layer succeeded")
	}
	if _, _, err := runTrace(t, "convert", "--to", "pb", "--layer", string(layers[0].Digest), "--layer", string(layers[1].Digest), obd, back); err != nil {
		t.Fatal(err)
	}
	got, err := recorder.ReadTraceFile(back, nil)
	if err != nil || len(got.Frames) != 2 || got.Frames[0].Offset != 4096 || got.Layers[1].Digest != layers[1].Digest {
		t.Fatalf("round trip through obd: %+v, %v", got, err)
	}
	if _, _, err := runTrace(t, "convert", "--to", "xml", pb, back); err == nil {
		t.Error("unknown format accepted")
	}

	plot := filepath.Join(dir, "plot.png")
	stdout, _, err := runTrace(t, "inspect", pb, "--plot", plot)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"frames:", "12.0 KiB", "span 1ms", string(layers[1].Digest)} {
		if !strings.Contains(stdout, want) {
			t.Errorf("inspect output lacks %q:\n%s", want, stdout)
		}
	}
	f, err := os.Open(plot)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := png.Decode(f); err != nil {
		t.Errorf("plot: %v", err)
	}
	stdout, _, err = runTrace(t, "inspect", "--json", obd)
	if err != nil {
		t.Fatal(err)
	}
	var s report.Summary
	if err := json.Unmarshal([]byte(stdout), &s); err != nil || s.Frames != 2 || s.Timed || len(s.Layers) != 2 || s.UniqueBytes != 12288 {
		t.Errorf("inspect --json of a binary trace: %+v, %v\n%s", s, err, stdout)
	}
	if _, _, err := runTrace(t, "inspect", filepath.Join(dir, "absent")); err == nil {
		t.Error("inspect of a missing file succeeded")
	}
}

// TestTraceInspectImageRef reads a trace layer from a real registry.
func TestTraceInspectImageRef(t *testing.T) {
	reg := registry.Start(t, registry.Options{})
	ref := reg.PushHelloWorld(t)
	client, err := regclient.New(regclient.Options{PlainHTTP: []string{reg.Host}})
	if err != nil {
		t.Fatal(err)
	}
	store, err := client.Store(ref)
	if err != nil {
		t.Fatal(err)
	}
	tr := &trace.Trace{
		Layers: []trace.Layer{{Digest: digest.FromString("base")}, {Digest: "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"}},
		Meta:   trace.Meta{Source: trace.SourceCLI, Runs: 1},
		Frames: []trace.Frame{{Layer: 1, Offset: 4096, Length: 8192, TimeNS: 5000}},
	}
	if _, err := image.AddTraceLayer(context.Background(), store, "obd", "traced", tr, image.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	cmd := newRootCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetArgs([]string{"trace", "inspect", "--insecure", "--json", reg.Host + "/hello-world:traced"})
	if err := cmd.ExecuteContext(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), `"frames": 1`) {
		t.Fatalf("inspect of an image ref printed %s", out.String())
	}
}
