package device

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
)

// The test binary doubles as a device server: with helperEnv set to a
// mount directory it serves the disk image file named by helperImageEnv
// (through a plain io.ReaderAt, so every read goes through the FUSE daemon)
// until it gets SIGTERM or is killed.
const (
	helperEnv       = "OBD_DEVICE_TEST_SERVE"
	helperImageEnv  = "OBD_DEVICE_TEST_IMAGE"
	helperTuningEnv = "OBD_DEVICE_TEST_TUNING" // JSON of a Tuning; default if unset
)

func TestMain(m *testing.M) {
	if dir := os.Getenv(helperEnv); dir != "" {
		if err := serveHelper(dir, os.Getenv(helperImageEnv), os.Getenv(helperTuningEnv)); err != nil {
			fmt.Fprintln(os.Stderr, "helper:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func serveHelper(dir, image, tuning string) error {
	f, err := os.Open(image)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	t := DefaultTuning()
	if tuning != "" {
		if err := json.Unmarshal([]byte(tuning), &t); err != nil {
			return fmt.Errorf("%s: %w", helperTuningEnv, err)
		}
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	d, err := FUSELoop{}.Attach(context.Background(), NewImage(f, st.Size()), Options{MountDir: dir, Tuning: &t})
	if err != nil {
		return err
	}
	fmt.Printf("DEVICE %s\n", d.Path())
	<-sig
	return d.Close()
}

// startHelper runs the test binary as a device server for image and
// returns the process and its device.
func startHelper(t *testing.T, dir, image string) (*exec.Cmd, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+dir, helperImageEnv+"="+image)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		Cleanup(context.Background(), dir)
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("helper did not report its device: %v", err)
	}
	dev, ok := strings.CutPrefix(strings.TrimSpace(line), "DEVICE ")
	if !ok {
		t.Fatalf("helper said %q", line)
	}
	return cmd, dev
}

func killHelper(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err == nil {
		t.Fatal("helper exited cleanly after SIGKILL")
	}
}

// mountedAt says whether /proc/mounts lists a mount at dir.
func mountedAt(t *testing.T, dir string) bool {
	t.Helper()
	mounts, err := fuseMountsAt(dir)
	if err != nil {
		t.Fatal(err)
	}
	return len(mounts) > 0
}

// TestKilledServerCleanup kills a serving process with SIGKILL: the loop
// device, held by nobody else, clears itself (autoclear); the dead FUSE
// mount stays until Cleanup removes it.
func TestKilledServerCleanup(t *testing.T) {
	needKernel(t)
	image := exportImage(t, helloStack(t)).File().Name()
	dir := filepath.Join(t.TempDir(), "fuse")
	cmd, dev := startHelper(t, dir, image)
	if b, ok := backingFile(filepath.Base(dev)); !ok || !isUnder(b, dir) {
		t.Fatalf("%s backing file %q, want one under %s", dev, b, dir)
	}
	killHelper(t, cmd)
	if !waitUnbound(context.Background(), filepath.Base(dev), 5*time.Second) {
		t.Errorf("%s still bound after its server died", dev)
	}
	if !mountedAt(t, dir) {
		t.Fatalf("the dead FUSE mount is already gone; nothing left to test")
	}
	// Attributes are cached for long, but an open must ask the dead server.
	if f, err := os.Open(filepath.Join(dir, imageFileName)); !errors.Is(err, unix.ENOTCONN) {
		t.Errorf("open on the dead mount: %v, want ENOTCONN", err)
		if err == nil {
			f.Close()
		}
	}
	if err := Cleanup(context.Background(), dir); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	checkGone(t, dev, dir, "")
	if err := Cleanup(context.Background(), dir); err != nil {
		t.Errorf("second Cleanup: %v", err)
	}
}

// TestKilledServerWhileMounted kills the server under a mounted ext4: the
// loop device stays bound (ext4 holds it), Cleanup says so with ErrBusy,
// reads the kernel has not cached fail instead of hanging, and once ext4 is unmounted nothing is
// left.
func TestKilledServerWhileMounted(t *testing.T) {
	needKernel(t)
	image := exportImage(t, helloStack(t)).File().Name()
	dir := filepath.Join(t.TempDir(), "fuse")
	cmd, dev := startHelper(t, dir, image)
	mnt := mountExt4(t, dev, true)
	if got := sha256File(t, filepath.Join(mnt, "hello")); got != testdata.HelloSHA256 {
		t.Fatalf("/hello sha256 %s before the kill", got)
	}
	killHelper(t, cmd)

	err := Cleanup(context.Background(), dir)
	if !errors.Is(err, ErrBusy) {
		t.Errorf("Cleanup with ext4 mounted: %v, want ErrBusy", err)
	}
	if mountedAt(t, dir) {
		t.Errorf("FUSE mount still at %s after Cleanup", dir)
	}
	done := make(chan error, 1)
	go func() {
		// Far from anything ext4 read, so not in the FUSE file's cache.
		_, err := readDirect(dev, 60<<30, 4096)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Errorf("read of %s succeeded with its server dead", dev)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("read of %s hangs with its server dead", dev)
	}
	unmount(t, mnt)
	if !waitUnbound(context.Background(), filepath.Base(dev), 5*time.Second) {
		t.Errorf("%s still bound after ext4 was unmounted", dev)
	}
	checkGone(t, dev, dir, "")
}
