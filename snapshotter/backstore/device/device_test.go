package device

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/lsmt"
)

// TestHelloWorldReadOnly is the frontend's main job: the upstream
// hello-world image, attached read-only, mounts as ext4 and /hello has the
// right bytes; Close leaves no loop device and no FUSE mount.
func TestHelloWorldReadOnly(t *testing.T) {
	needKernel(t)
	stack := helloStack(t)
	dir := filepath.Join(t.TempDir(), "fuse")
	d := attach(t, NewImage(stack, stack.VirtualSize()), Options{MountDir: dir})

	name := filepath.Base(d.Path())
	if b, ok := backingFile(name); !ok || b != filepath.Join(dir, imageFileName) {
		t.Errorf("%s backing file %q (bound %v), want %s", d.Path(), b, ok, filepath.Join(dir, imageFileName))
	}
	var st unix.Stat_t
	if err := unix.Stat(d.Path(), &st); err != nil {
		t.Fatal(err)
	}
	if major, minor := d.Dev(); unix.Mkdev(major, minor) != st.Rdev {
		t.Errorf("Dev() = %d:%d, stat says %d:%d", major, minor, unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	if ro, err := os.ReadFile("/sys/block/" + name + "/ro"); err != nil || strings.TrimSpace(string(ro)) != "1" {
		t.Errorf("/sys/block/%s/ro = %q (%v), want 1", name, ro, err)
	}
	if size := sysSize(t, name); size != stack.VirtualSize() {
		t.Errorf("device size %d, want %d", size, stack.VirtualSize())
	}
	if f, err := os.OpenFile(d.Path(), os.O_WRONLY, 0); err == nil {
		if _, err := f.WriteAt(make([]byte, 4096), 0); err == nil {
			t.Errorf("wrote to a read-only device")
		}
		f.Close()
	}

	mnt := mountExt4(t, d.Path(), true)
	if got := sha256File(t, filepath.Join(mnt, "hello")); got != testdata.HelloSHA256 {
		t.Errorf("/hello sha256 %s, want %s", got, testdata.HelloSHA256)
	}
	unmount(t, mnt)
	if err := d.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	checkGone(t, d.Path(), dir, "")
	if err := d.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := d.SwitchToFile(context.Background(), "/dev/null"); !errors.Is(err, ErrClosed) {
		t.Errorf("SwitchToFile after Close: %v, want ErrClosed", err)
	}
}

func sysSize(t testing.TB, name string) int64 {
	t.Helper()
	b, err := os.ReadFile("/sys/block/" + name + "/size")
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n * 512
}

// TestVariantsReadSameBytes reads the hello-world disk through the device
// with each tuning lever, concurrently and with O_DIRECT so each read
// reaches the loop device, and compares with the image's own bytes.
func TestVariantsReadSameBytes(t *testing.T) {
	needKernel(t)
	stack := helloStack(t)
	local := exportImage(t, stack)
	for _, v := range tuningVariants() {
		t.Run(v.name, func(t *testing.T) {
			var img Image = NewImage(stack, stack.VirtualSize())
			if v.local {
				img = local
			}
			tun := v.tuning
			d := attach(t, img, Options{Tuning: &tun})
			want := NewImage(stack, stack.VirtualSize())
			compareConcurrently(t, d.Path(), want, 8, 200)
			fs := d.(*fuseLoopDevice).fs
			first := fs.reads.Load()
			switch {
			case v.local && tun.Passthrough:
				if first != 0 {
					t.Errorf("passthrough: %d reads reached the daemon, want 0", first)
				}
			case !tun.LoopDirectIO:
				// The same ranges again, still right. How many of them the
				// FUSE file's cache absorbs is a performance figure (it
				// varied from 16 % to 60 % of the cold pass with other I/O
				// on this shared machine), measured by BenchmarkDevice and
				// reported in docs, not asserted here.
				compareConcurrently(t, d.Path(), want, 8, 200)
				t.Logf("daemon reads: cold pass %d, warm pass %d", first, fs.reads.Load()-first)
			default:
				if first == 0 {
					t.Errorf("loop direct I/O: no read reached the daemon")
				}
			}
		})
	}
}

type variant struct {
	name   string
	tuning Tuning
	local  bool // serve a FileImage, so passthrough can apply
}

// tuningVariants are the levers measured in docs/device.md.
func tuningVariants() []variant {
	def := DefaultTuning()
	noCache := def
	noCache.KeepCache, noCache.CacheTimeout = false, time.Second
	dio := def
	dio.LoopDirectIO = true
	small := def
	small.MaxRead, small.LoopBlockSize = 128<<10, 512
	syncRead := def
	syncRead.SyncRead = true
	pass := def
	pass.Passthrough = true
	passDIO := pass
	passDIO.LoopDirectIO = true
	noPass := def
	noPass.Passthrough = false
	return []variant{
		{"default", def, false},
		{"no-keep-cache", noCache, false},
		{"loop-dio", dio, false},
		{"max-read-128k-bs-512", small, false},
		{"sync-read", syncRead, false},
		{"local-no-passthrough", noPass, true},
		{"local-passthrough", pass, true},
		{"local-passthrough-dio", passDIO, true},
	}
}

// exportImage writes img's disk to a local file and opens it as a
// FileImage.
func exportImage(t testing.TB, s *lsmt.Stack) *FileImage {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	if _, err := lsmt.Export(context.Background(), path, s, nil); err != nil {
		t.Fatal(err)
	}
	img, err := OpenFileImage(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

// compareConcurrently reads random ranges of dev with O_DIRECT from
// workers goroutines and compares them with want. Reads favour the start
// of the disk, where the image's data is.
func compareConcurrently(t testing.TB, dev string, want Image, workers, reads int) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- compareRandom(dev, want, rand.New(rand.NewPCG(uint64(w), 7)), reads)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

func compareRandom(dev string, want Image, rng *rand.Rand, reads int) error {
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := alignedBuf(1 << 20)
	exp := make([]byte, 1<<20)
	for range reads {
		off := rng.Int64N(64<<20/4096) * 4096 // the image's data is in its first MiBs
		n := (1 + rng.IntN(256)) * 4096
		if _, err := f.ReadAt(buf[:n], off); err != nil {
			return fmt.Errorf("read %d at %d: %w", n, off, err)
		}
		if _, err := want.ReadAt(exp[:n], off); err != nil {
			return fmt.Errorf("reference read %d at %d: %w", n, off, err)
		}
		if !bytes.Equal(buf[:n], exp[:n]) {
			return fmt.Errorf("%s: %d bytes at %d differ from the image", dev, n, off)
		}
	}
	return nil
}

// countingReader counts the bytes read from it.
type countingReader struct {
	r io.ReaderAt
	n atomic.Int64
}

func (c *countingReader) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.n.Add(int64(n))
	return n, err
}

// TestLimitReadAhead: 4 KiB reads one after the other on the loop device
// read more of the image than they ask for (the FUSE file's readahead
// sees a sequential reader), and exactly what they ask for while the
// limit is on; off again, the readahead is back.
func TestLimitReadAhead(t *testing.T) {
	needKernel(t)
	disk := make([]byte, 64<<20)
	src := &countingReader{r: bytes.NewReader(disk)}
	d := attach(t, NewImage(src, int64(len(disk))), Options{})
	lim, ok := d.(ReadAheadLimiter)
	if !ok {
		t.Fatalf("%T is no ReadAheadLimiter", d)
	}
	// Each run at a fresh offset, far from the others, so that no page of
	// it is cached yet and no readahead state carries over.
	const reads = 8
	run := func(off int64) int64 {
		t.Helper()
		before := src.n.Load()
		for k := range int64(reads) {
			if _, err := readDirect(d.Path(), off+k*4096, 4096); err != nil {
				t.Fatal(err)
			}
		}
		// Readahead reaches the daemon asynchronously: count it all here,
		// not in the next run.
		for n := int64(-1); n != src.n.Load(); {
			n = src.n.Load()
			time.Sleep(50 * time.Millisecond)
		}
		return src.n.Load() - before
	}
	if got := run(8 << 20); got <= reads*4096 {
		t.Errorf("limit off: %d sequential 4 KiB reads read %d bytes of the image, want readahead beyond them", reads, got)
	}
	if err := lim.LimitReadAhead(true); err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{16 << 20, 24<<20 + 4096} {
		if got := run(off); got != reads*4096 {
			t.Errorf("limit on: %d sequential 4 KiB reads at %d read %d bytes of the image, want %d", reads, off, got, reads*4096)
		}
	}
	if err := lim.LimitReadAhead(false); err != nil {
		t.Fatal(err)
	}
	if got := run(48 << 20); got <= reads*4096 {
		t.Errorf("limit off again: %d sequential 4 KiB reads read %d bytes of the image, want readahead beyond them", reads, got)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := lim.LimitReadAhead(true); err != nil {
		t.Errorf("after Close: %v, want nothing to do", err)
	}
}
