package lsmt_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/obdtrace/obdtrace/internal/testutil"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/lsmt"
)

// TestUpstreamHelloWorld is the compatibility check: the upstream baselayer
// and hello-world layer, stacked, exported and read with debugfs, give the
// bytes of /hello in the original image.
func TestUpstreamHelloWorld(t *testing.T) {
	debugfs := testutil.RequireTool(t, "debugfs")
	base := testdata.OpenBlob(t, testdata.Baselayer(t))
	hello := testdata.OpenBlob(t, testdata.Blob(t, testdata.HelloLayerDigest))

	if base.TarWrapped || base.ZFile == nil {
		t.Errorf("baselayer: tar %v zfile %v, want a bare ZFile", base.TarWrapped, base.ZFile != nil)
	}
	info := hello.Info(642560)
	if got := info.Wrappers; len(got) != 3 || got[0] != "tar" || got[1] != "zfile" || got[2] != "lsmt" {
		t.Errorf("hello layer wrappers %v, want tar, zfile, lsmt", got)
	}
	if info.Tar.PayloadOffset != 1536 || info.Tar.PayloadSize != 639491 {
		t.Errorf("tar payload %+v, want 1536+639491", *info.Tar)
	}
	if info.ZFile.Algorithm != "lz4" || info.ZFile.BlockSize != 4096 || !info.ZFile.Verify {
		t.Errorf("zfile %+v", *info.ZFile)
	}
	if info.LSMT.VirtualSize != 64<<30 || base.VirtualSize() != 64<<30 {
		t.Errorf("virtual sizes %d and %d, want 64 GiB", info.LSMT.VirtualSize, base.VirtualSize())
	}

	stack, err := lsmt.NewStack([]lsmt.StackLayer{base, hello})
	if err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(t.TempDir(), "disk.img")
	written, err := lsmt.Export(context.Background(), disk, stack, nil)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(disk)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != 64<<30 {
		t.Errorf("exported disk is %d bytes, want 64 GiB", st.Size())
	}
	if written > 64<<20 {
		t.Errorf("wrote %d bytes of a mostly empty disk: holes not kept", written)
	}
	out, err := exec.Command(debugfs, "-R", "cat /hello", disk).Output()
	if err != nil {
		t.Fatalf("debugfs: %v", err)
	}
	sum := sha256.Sum256(out)
	if got := hex.EncodeToString(sum[:]); got != testdata.HelloSHA256 || len(out) != testdata.HelloSize {
		t.Fatalf("/hello: %d bytes, sha256 %s; want %d bytes, %s", len(out), got, testdata.HelloSize, testdata.HelloSHA256)
	}
}

// TestRecommitUpstreamLayer commits the hello-world layer's own index and
// data again and compares with the original LSMT bytes.
func TestRecommitUpstreamLayer(t *testing.T) {
	hello := testdata.OpenBlob(t, testdata.Blob(t, testdata.HelloLayerDigest))
	orig := make([]byte, hello.Size())
	if _, err := hello.Source().ReadAt(orig, 0); err != nil {
		t.Fatal(err)
	}
	tr := hello.Trailer()
	var buf bytes.Buffer
	err := lsmt.Commit(&buf, hello.Source(), hello.Index(), lsmt.CommitArgs{
		VirtualSize: hello.VirtualSize(), UUID: tr.UUID, ParentUUID: tr.ParentUUID, UserTag: tr.UserTag,
	})
	if err != nil {
		t.Fatal(err)
	}
	got := buf.Bytes()
	if len(got) != len(orig) {
		t.Fatalf("re-committed layer is %d bytes, original %d", len(got), len(orig))
	}
	dataAndIndex := func(b []byte) []byte { return b[lsmt.HeaderSize : len(b)-lsmt.HeaderSize] }
	if !bytes.Equal(dataAndIndex(got), dataAndIndex(orig)) {
		t.Fatal("data area or index differs from the original")
	}
	if !bytes.Equal(got, orig) {
		t.Log("header or trailer slot differs from upstream's (data and index identical)")
	}
}
