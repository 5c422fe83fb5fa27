package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/lsmt"
)

func run(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	cmd := newRootCommand()
	cmd.SetArgs(args)
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	err := cmd.ExecuteContext(context.Background())
	return out.String(), errOut.String(), err
}

func TestLayerInspect(t *testing.T) {
	blob := testdata.Blob(t, testdata.HelloLayerDigest)
	out, _, err := run(t, "layer", "inspect", "--json", blob)
	if err != nil {
		t.Fatal(err)
	}
	var info lsmt.BlobInfo
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("inspect --json printed %q: %v", out, err)
	}
	if strings.Join(info.Wrappers, ",") != "tar,zfile,lsmt" || info.LSMT.Segments != 515 ||
		info.LSMT.VirtualSize != 64<<30 || info.ZFile.Blocks != 17463 {
		t.Fatalf("inspect: %+v", info)
	}
	out, _, err = run(t, "layer", "inspect", blob)
	if err != nil || !strings.Contains(out, "tar -> zfile -> lsmt") || !strings.Contains(out, "515 segments") {
		t.Fatalf("inspect text %q (err %v)", out, err)
	}
}

func TestLayerExport(t *testing.T) {
	disk := filepath.Join(t.TempDir(), "disk.img")
	_, msg, err := run(t, "layer", "export", "--out", disk,
		testdata.Baselayer(t), testdata.Blob(t, testdata.HelloLayerDigest))
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(disk)
	if err != nil || st.Size() != 64<<30 || !strings.Contains(msg, "64.0 GiB virtual disk") {
		t.Fatalf("export: %v %v %q", st, err, msg)
	}
}

func TestLayerErrors(t *testing.T) {
	notBlob := filepath.Join(t.TempDir(), "junk")
	if err := os.WriteFile(notBlob, bytes.Repeat([]byte("x"), 10000), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"layer", "inspect", notBlob},
		{"layer", "inspect", "/nonexistent"},
		{"layer", "export", notBlob},
		{"layer", "export", "--out", filepath.Join(t.TempDir(), "d"), notBlob},
	} {
		if _, _, err := run(t, args...); err == nil {
			t.Errorf("%v: no error", args)
		} else {
			t.Logf("%v: %v", args, err)
		}
	}
}
