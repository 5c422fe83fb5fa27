package convert

import (
	"archive/tar"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/obdtrace/obdtrace/internal/testutil"
)

// TestApplyDirectoryTimes applies a layer to a plain directory and checks
// the times of the directories it changed: unnamed ones keep theirs,
// created parents get the layer's newest mtime, named ones the tar's.
func TestApplyDirectoryTimes(t *testing.T) {
	testutil.RequireRoot(t, "it unpacks with ownership")
	root := t.TempDir()
	t0 := time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, d := range []string{"a", "keep", "gone"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "a", "old"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"a", "keep", "gone", "."} {
		if err := os.Chtimes(filepath.Join(root, p), t0, t0); err != nil {
			t.Fatal(err)
		}
	}
	t3 := time.Date(2023, 3, 3, 0, 0, 0, 0, time.UTC)
	t5 := time.Date(2025, 5, 5, 0, 0, 0, 0, time.UTC)
	layer := filepath.Join(t.TempDir(), "layer.tar")
	writeTar(t, layer, []tarEntry{
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "a/new", Mode: 0o644, ModTime: t3}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "a/.wh.old", ModTime: t3}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: ".wh.gone", ModTime: t3}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "b/c/d", Mode: 0o644, ModTime: t5}},
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "keep/", Mode: 0o700, ModTime: t3}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "keep/f", Mode: 0o644, ModTime: t3}},
	})
	f, err := os.Open(layer)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := applyLayer(context.Background(), root, f); err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]time.Time{".": t0, "a": t0, "b": t5, "b/c": t5, "keep": t3} {
		st, err := os.Stat(filepath.Join(root, p))
		if err != nil {
			t.Fatal(err)
		}
		if !st.ModTime().Equal(want) {
			t.Errorf("%s: mtime %v, want %v", p, st.ModTime().UTC(), want)
		}
	}
	for _, gone := range []string{"gone", "a/old"} {
		if _, err := os.Lstat(filepath.Join(root, gone)); !os.IsNotExist(err) {
			t.Errorf("%s survived its whiteout: %v", gone, err)
		}
	}
}

// TestApplyRejectsBadTar checks that a tar that is not one fails the
// apply with an error rather than a partial success.
func TestApplyRejectsBadTar(t *testing.T) {
	testutil.RequireRoot(t, "it unpacks with ownership")
	err := applyLayer(context.Background(), t.TempDir(), strings.NewReader(strings.Repeat("not a tar ", 100)))
	if err == nil {
		t.Fatal("garbage applied without an error")
	}
}
