package device

import (
	"bytes"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/lsmt"
)

// files are what the writable tests put on the file system.
func testFiles() map[string][]byte {
	rng := rand.New(rand.NewPCG(1, 2))
	big := make([]byte, 5<<20+123)
	for i := range big {
		big[i] = byte(rng.Uint32())
	}
	return map[string][]byte{
		"small.txt":     []byte("written through FUSE and loop\n"),
		"a/b/c/big.bin": big,
		"empty":         nil,
	}
}

func writeFiles(t *testing.T, root string, files map[string][]byte) {
	t.Helper()
	for name, data := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func checkFiles(t *testing.T, root string, files map[string][]byte) {
	t.Helper()
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join(root, name))
		if err != nil {
			t.Errorf("read back %s: %v", name, err)
			continue
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s: read back %d bytes differing from the %d written", name, len(got), len(want))
		}
	}
}

// writableLayer creates a writable LSMT layer of size bytes in dir.
func writableLayer(t *testing.T, dir string, size int64) *lsmt.Writable {
	t.Helper()
	w, err := lsmt.CreateWritable(filepath.Join(dir, "data"), filepath.Join(dir, "index"),
		lsmt.WritableOptions{VirtualSize: size, UUID: "b3a8a6a4-5e44-4f7a-9a57-1d2f7c1e0a01"})
	if err != nil {
		t.Fatal(err)
	}
	return w
}

func reopenLayer(t *testing.T, dir string) *lsmt.Writable {
	t.Helper()
	w, err := lsmt.OpenWritable(filepath.Join(dir, "data"), filepath.Join(dir, "index"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return w
}

// TestWritableMkfs formats a device backed by a fresh writable LSMT layer,
// writes files through ext4, and reads them back from the reopened layer
// through a fresh device.
func TestWritableMkfs(t *testing.T) {
	needKernel(t)
	mkfs := needTool(t, "mkfs.ext4")
	const size = 256 << 20
	layerDir := t.TempDir()
	w := writableLayer(t, layerDir, size)
	ov, err := NewOverlay(nil, w, size)
	if err != nil {
		t.Fatal(err)
	}
	d := attach(t, ov, Options{Writable: true})
	if ro, _ := os.ReadFile("/sys/block/" + filepath.Base(d.Path()) + "/ro"); strings.TrimSpace(string(ro)) != "0" {
		t.Fatalf("writable device is read-only (ro=%q)", ro)
	}
	// mkfs discards the whole device first, which reaches the layer as
	// hole punches.
	if out, err := exec.Command(mkfs, "-q", "-F", "-b", "4096", d.Path()).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	fs := d.(*fuseLoopDevice).fs
	if fs.discards.Load() == 0 {
		t.Errorf("mkfs.ext4's discards never reached the layer")
	}
	mnt := mountExt4(t, d.Path(), false)
	files := testFiles()
	writeFiles(t, mnt, files)
	unmount(t, mnt)
	if fs.writes.Load() == 0 || fs.syncs.Load() == 0 {
		t.Errorf("%d writes and %d syncs reached the layer, want both", fs.writes.Load(), fs.syncs.Load())
	}
	if err := d.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}

	w2 := reopenLayer(t, layerDir)
	if n := len(w2.Index()); n == 0 {
		t.Fatal("the reopened layer holds no writes")
	}
	ov2, err := NewOverlay(nil, w2, size)
	if err != nil {
		t.Fatal(err)
	}
	d2 := attach(t, ov2, Options{})
	checkFiles(t, mountExt4(t, d2.Path(), true), files)
}

// TestWritableOverHelloWorld is the converter's case: a writable layer
// stacked over the hello-world image's read-only layers, mounted read-write;
// the new files land in the writable layer only and read back over the
// same lowers, next to the image's /hello.
func TestWritableOverHelloWorld(t *testing.T) {
	needKernel(t)
	stack := helloStack(t)
	layerDir := t.TempDir()
	w := writableLayer(t, layerDir, stack.VirtualSize())
	ov, err := NewOverlay(stack, w, stack.VirtualSize())
	if err != nil {
		t.Fatal(err)
	}
	d := attach(t, ov, Options{Writable: true})
	mnt := mountExt4(t, d.Path(), false)
	if got := sha256File(t, filepath.Join(mnt, "hello")); got != testdata.HelloSHA256 {
		t.Errorf("/hello sha256 %s through the overlay, want %s", got, testdata.HelloSHA256)
	}
	files := testFiles()
	writeFiles(t, mnt, files)
	if err := os.Remove(filepath.Join(mnt, "hello")); err != nil {
		t.Fatal(err)
	}
	unmount(t, mnt)
	if err := d.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}

	// The lowers are unchanged: a device of the stack alone still has /hello.
	d0 := attach(t, NewImage(stack, stack.VirtualSize()), Options{})
	if got := sha256File(t, filepath.Join(mountExt4(t, d0.Path(), true), "hello")); got != testdata.HelloSHA256 {
		t.Errorf("lower /hello sha256 %s after writing over it", got)
	}

	ov2, err := NewOverlay(stack, reopenLayer(t, layerDir), stack.VirtualSize())
	if err != nil {
		t.Fatal(err)
	}
	d2 := attach(t, ov2, Options{})
	mnt2 := mountExt4(t, d2.Path(), true)
	checkFiles(t, mnt2, files)
	if _, err := os.Stat(filepath.Join(mnt2, "hello")); !os.IsNotExist(err) {
		t.Errorf("/hello after removing it in the upper layer: %v, want not found", err)
	}
}
