package device

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/lsmt"
)

// needKernel fails under CI and skips elsewhere unless the test can use
// real loop devices and FUSE (root, /dev/fuse, /dev/loop-control).
func needKernel(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("kernel test: skipped with -short")
	}
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root")
	}
	for _, p := range []string{"/dev/fuse", loopControlPath} {
		if _, err := os.Stat(p); err != nil {
			missing = append(missing, p)
		}
	}
	if len(missing) == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("loop and FUSE tests need %s under CI", strings.Join(missing, ", "))
	}
	t.Skipf("loop and FUSE tests need %s", strings.Join(missing, ", "))
}

// needTool fails under CI and skips elsewhere when a command is missing.
func needTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s is required under CI (make deps installs it): %v", name, err)
	}
	t.Skipf("%s not installed (make deps installs it)", name)
	return ""
}

// helloStack is the upstream hello-world image: the ext4_64 baselayer and
// the converted hello-world layer.
func helloStack(t testing.TB) *lsmt.Stack {
	t.Helper()
	base := testdata.OpenBlob(t, testdata.Baselayer(t))
	hello := testdata.OpenBlob(t, testdata.Blob(t, testdata.HelloLayerDigest))
	s, err := lsmt.NewStack([]lsmt.StackLayer{base, hello})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// attach attaches img and closes the device at the end of the test.
func attach(t testing.TB, img Image, opts Options) Device {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if opts.MountDir == "" {
		opts.MountDir = filepath.Join(t.TempDir(), "fuse")
	}
	d, err := FUSELoop{}.Attach(ctx, img, opts)
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// mountExt4 mounts dev at a new directory, unmounted at the end of the test.
func mountExt4(t testing.TB, dev string, readOnly bool) string {
	t.Helper()
	dir := t.TempDir()
	var flags uintptr
	data := ""
	if readOnly {
		flags, data = unix.MS_RDONLY, "noload"
	}
	if err := unix.Mount(dev, dir, "ext4", flags, data); err != nil {
		t.Fatalf("mount -t ext4 %s %s: %v", dev, dir, err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

func unmount(t testing.TB, dir string) {
	t.Helper()
	if err := unix.Unmount(dir, 0); err != nil {
		t.Fatalf("umount %s: %v", dir, err)
	}
}

func sha256File(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// checkGone asserts that no loop device is bound to a file under dir or to
// the file backing, and that nothing is mounted at dir. A loop device's
// number is free for others once released, and tests of other packages
// bind loop devices at the same time, so dev itself may be bound again, to
// someone else's file: only a binding to ours counts.
func checkGone(t testing.TB, dev, dir, backing string) {
	t.Helper()
	ours := func(b string) bool { return isUnder(b, dir) || (backing != "" && b == backing) }
	loops, err := boundLoops()
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range loops {
		if ours(b) {
			t.Errorf("loop device %s still bound to %s", name, b)
		}
	}
	out, err := exec.Command("losetup", "-a").CombinedOutput()
	if err == nil && dev != "" {
		for _, line := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(line, dev+":") && (strings.Contains(line, dir) || (backing != "" && strings.Contains(line, backing))) {
				t.Errorf("losetup -a still lists %s bound to our file: %s", dev, line)
			}
		}
	}
	mounts, err := os.ReadFile("/proc/mounts")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(mounts), "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[1] == dir {
			t.Errorf("still mounted at %s: %s", dir, line)
		}
	}
}

// readDirect reads n bytes at off of path with O_DIRECT, so the read
// reaches the device under whatever page cache sits above it.
func readDirect(path string, off int64, n int) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf := alignedBuf(n)
	got, err := f.ReadAt(buf, off)
	if got == n {
		err = nil // a full read that ends at the end of the file
	}
	return buf[:got], err
}

// alignedBuf returns n bytes aligned to 4096, as O_DIRECT wants.
func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	off := (4096 - int(uintptr(unsafe.Pointer(&b[0]))%4096)) % 4096
	return b[off : off+n]
}
