package device

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
)

// directSHA256 hashes a file read with O_DIRECT, so every read goes down to
// the block device instead of ext4's page cache.
func directSHA256(path string) (string, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return "", err
	}
	defer f.Close()
	buf := alignedBuf(64 << 10)
	h := sha256.New()
	for off := int64(0); ; {
		n, err := f.ReadAt(buf, off)
		h.Write(buf[:n])
		off += int64(n)
		if errors.Is(err, io.EOF) {
			return hex.EncodeToString(h.Sum(nil)), nil
		}
		if err != nil {
			return "", err
		}
	}
}

// TestSwitchToFileWhileReading moves a device from its FUSE file to a local
// copy of the image while readers hammer the device: no read fails or
// returns wrong bytes, the FUSE mount is gone afterwards, and ext4 mounts
// on the switched device. With ext4 mounted the switch is refused, since
// the kernel would shut ext4 down, and ext4 keeps reading.
func TestSwitchToFileWhileReading(t *testing.T) {
	needKernel(t)
	stack := helloStack(t)
	local := exportImage(t, stack)
	dir := filepath.Join(t.TempDir(), "fuse")
	d := attach(t, NewImage(stack, stack.VirtualSize()), Options{MountDir: dir})
	fs := d.(*fuseLoopDevice).fs

	mnt := mountExt4(t, d.Path(), true)
	if err := d.SwitchToFile(context.Background(), local.File().Name()); !errors.Is(err, ErrBusy) {
		t.Errorf("SwitchToFile with ext4 mounted: %v, want ErrBusy", err)
	}
	if sum, err := directSHA256(filepath.Join(mnt, "hello")); err != nil || sum != testdata.HelloSHA256 {
		t.Errorf("/hello after the refused switch: sha256 %s, %v", sum, err)
	}
	unmount(t, mnt)

	var stop atomic.Bool
	var rounds atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), 11))
			for !stop.Load() {
				if err := compareRandom(d.Path(), local, rng, 4); err != nil {
					errs <- err
					return
				}
				rounds.Add(1)
			}
		}()
	}
	waitFor := func(n int64) {
		for deadline := time.Now().Add(10 * time.Second); rounds.Load() < n && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitFor(20)
	if err := d.SwitchToFile(context.Background(), local.File().Name()); err != nil {
		t.Errorf("SwitchToFile: %v", err)
	}
	daemonReads := fs.reads.Load()
	waitFor(rounds.Load() + 20)
	stop.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if b, _ := backingFile(filepath.Base(d.Path())); b != local.File().Name() {
		t.Errorf("backing file %q after the switch, want %s", b, local.File().Name())
	}
	if mountedAt(t, dir) {
		t.Errorf("FUSE still mounted at %s after the switch", dir)
	}
	if n := fs.reads.Load(); n != daemonReads {
		t.Errorf("the daemon served %d reads after the switch", n-daemonReads)
	}
	mnt = mountExt4(t, d.Path(), true)
	if sum, err := directSHA256(filepath.Join(mnt, "hello")); err != nil || sum != testdata.HelloSHA256 {
		t.Errorf("/hello on the switched device: sha256 %s, %v", sum, err)
	}
	unmount(t, mnt)
	if err := d.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	checkGone(t, d.Path(), dir, local.File().Name())
}

func TestSwitchToFileRefused(t *testing.T) {
	needKernel(t)
	stack := helloStack(t)
	short := filepath.Join(t.TempDir(), "short.img")
	if err := os.WriteFile(short, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	d := attach(t, NewImage(stack, stack.VirtualSize()), Options{})
	if err := d.SwitchToFile(context.Background(), short); !errors.Is(err, ErrSize) {
		t.Errorf("switch to a file of the wrong size: %v, want ErrSize", err)
	}
	if err := d.SwitchToFile(context.Background(), filepath.Join(t.TempDir(), "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("switch to a missing file: %v, want not found", err)
	}

	w := writableLayer(t, t.TempDir(), 64<<20)
	t.Cleanup(func() { w.Close() })
	ov, err := NewOverlay(nil, w, 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	dw := attach(t, ov, Options{Writable: true})
	if err := dw.SwitchToFile(context.Background(), short); !errors.Is(err, ErrUnsupported) {
		t.Errorf("switch of a writable device: %v, want ErrUnsupported", err)
	}
}

// TestCloseWhileMounted closes a device ext4 is still mounted on: Close
// returns ErrBusy promptly instead of hanging, the FUSE mount is gone at
// once, uncached reads fail, and the loop device goes when ext4 is
// unmounted.
func TestCloseWhileMounted(t *testing.T) {
	needKernel(t)
	stack := helloStack(t)
	dir := filepath.Join(t.TempDir(), "fuse")
	d := attach(t, NewImage(stack, stack.VirtualSize()), Options{MountDir: dir})
	mnt := mountExt4(t, d.Path(), true)

	start := time.Now()
	err := d.Close()
	if !errors.Is(err, ErrBusy) {
		t.Errorf("Close with ext4 mounted: %v, want ErrBusy", err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("Close took %v", el)
	}
	if mountedAt(t, dir) {
		t.Errorf("FUSE still mounted at %s", dir)
	}
	if _, err := readDirect(d.Path(), 60<<30, 4096); err == nil {
		t.Errorf("uncached read succeeded after Close")
	}
	unmount(t, mnt)
	if !waitUnbound(context.Background(), filepath.Base(d.Path()), 5*time.Second) {
		t.Errorf("%s still bound after ext4 was unmounted", d.Path())
	}
	checkGone(t, d.Path(), dir, "")
}
