package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/obdtrace/obdtrace/convert"
	"github.com/obdtrace/obdtrace/internal/testutil"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
)

func runConvert(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	cmd := newConvertCommand()
	cmd.SetArgs(args)
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	err := cmd.ExecuteContext(context.Background())
	return out.String(), err
}

func TestConvertCommand(t *testing.T) {
	testutil.RequireRoot(t, "loop devices, FUSE, mount")
	cache, out := t.TempDir(), t.TempDir()
	common := []string{"--baselayer", testdata.Baselayer(t), "--cache-dir", cache, "--work-dir", t.TempDir()}
	src := "oci:" + testdata.OCILayout(t) + ":amd64"
	text, err := runConvert(t, append(common, src, "oci:"+out+":hello")...)
	if err != nil {
		t.Fatalf("convert: %v\n%s", err, text)
	}
	for _, want := range []string{"oci:" + out + ":hello:", "manifest linux/amd64:", "layer 0:", "baselayer", "layer 1:", "converted"} {
		if !strings.Contains(text, want) {
			t.Errorf("output lacks %q:\n%s", want, text)
		}
	}
	text, err = runConvert(t, append(common, "--json", src, "oci:"+t.TempDir())...)
	if err != nil {
		t.Fatalf("convert --json: %v\n%s", err, text)
	}
	var res convert.Result
	if err := json.Unmarshal([]byte(text), &res); err != nil {
		t.Fatalf("--json output: %v\n%s", err, text)
	}
	if len(res.Images) != 1 || len(res.Images[0].Layers) != 2 || !res.Images[0].Layers[1].Cached {
		t.Errorf("second conversion should reuse the cached layer: %+v", res.Images)
	}
}

func TestConvertCommandErrors(t *testing.T) {
	for _, args := range [][]string{
		{"only-one"},
		{"--mkfs", "--vsize", "0", "oci:/a", "oci:/b"},
		{"--insecure", "oci:", "oci:/b"},
		{"--compression", "gzip", "oci:/a", "oci:/b"},
		{"--compression", "lz4", "--zstd-level", "5", "oci:/a", "oci:/b"},
		{"--block-size", "3", "oci:/a", "oci:/b"},
	} {
		if _, err := runConvert(t, args...); err == nil {
			t.Errorf("convert %v: no error", args)
		}
	}
}
