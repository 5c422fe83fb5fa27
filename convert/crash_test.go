package convert

import (
	"archive/tar"
	"bufio"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
)

// childEnv carries the arguments of a conversion run in a child process
// (layout, work, cache and output directories and the baselayer,
// separated by newlines). The child makes no temporary directories of its
// own: it is killed, so it could not remove them.
const childEnv = "OBD_CONVERT_CRASH_CHILD"

// killDelay is how long after its layer is mounted the converter is
// killed: in the middle of writing the layer.
const killDelay = 300 * time.Millisecond

// TestKilledConverterIsReclaimed kills a converter (a child process) while
// its layer is mounted, and checks that the next conversion in the same
// work directory takes down the mount, loop device and FUSE mount it left
// and removes its files.
func TestKilledConverterIsReclaimed(t *testing.T) {
	if args := os.Getenv(childEnv); args != "" {
		a := strings.Split(args, "\n")
		c, err := New(Options{Baselayer: a[4], CacheDir: a[2], WorkDir: a[1]})
		if err != nil {
			t.Fatal(err)
		}
		c.Convert(context.Background(), "oci:"+a[0]+":big", "oci:"+a[3]+":big")
		return
	}
	needKernel(t)
	dir := t.TempDir()
	bigTar := filepath.Join(dir, "big.tar")
	writeZeroTar(t, bigTar, 768<<20)
	layout := filepath.Join(dir, "src")
	writeTestLayout(t, layout, "big", []testLayer{{bigTar, gzipped}}, nil)
	work := t.TempDir()

	cmd := exec.Command(os.Args[0], "-test.run=^TestKilledConverterIsReclaimed$")
	cmd.Env = append(os.Environ(), childEnv+"="+strings.Join([]string{layout, work, t.TempDir(), t.TempDir(), testdata.Baselayer(t)}, "\n"))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for !hasExt4Mount(work) {
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatal("the child never mounted its layer")
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(killDelay)
	cmd.Process.Kill()
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		// A converter stuck on its own FUSE server: abort the connection
		// so the test leaves nothing behind, and fail.
		for _, l := range leftovers(work) {
			if f := strings.Fields(l); len(f) > 5 && strings.HasSuffix(f[5], "/fuse") {
				exec.Command("umount", "-f", f[5]).Run()
			}
		}
		t.Fatal("the killed converter did not exit")
	}
	if len(leftovers(work)) == 0 {
		t.Fatal("the killed converter left nothing to clean up: the test proves nothing")
	}

	c := newTestConverter(t, "", func(o *Options) { o.WorkDir = work })
	convertOK(t, c, "oci:"+testdata.OCILayout(t)+":amd64", "oci:"+t.TempDir()+":hello")
	if l := leftovers(work); len(l) > 0 {
		t.Errorf("left behind after reclaiming:\n%s", strings.Join(l, "\n"))
	}
	if stale, _ := filepath.Glob(filepath.Join(work, workDirPattern+"*")); len(stale) > 0 {
		t.Errorf("work directories left: %v", stale)
	}
}

func hasExt4Mount(dir string) bool {
	for _, l := range leftovers(dir) {
		if strings.Contains(l, " ext4 ") {
			return true
		}
	}
	return false
}

// writeZeroTar writes a tar holding one file of size zero bytes.
func writeZeroTar(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	bw := bufio.NewWriterSize(f, 1<<20)
	tw := tar.NewWriter(bw)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "zeros", Mode: 0o644, Size: size}); err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(tw, zeroReader{}, size); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := bw.Flush(); err != nil {
		t.Fatal(err)
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
