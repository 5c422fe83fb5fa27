package device

import (
	"context"
	"crypto/rand"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// residentBytes is how much of path's data is in the page cache (mincore).
func residentBytes(b *testing.B, path string) int64 {
	b.Helper()
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || st.Size() == 0 {
		b.Fatalf("stat %s: %v (size %d)", path, err, st.Size())
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		b.Fatalf("mmap %s: %v", path, err)
	}
	defer unix.Munmap(m)
	page := int64(os.Getpagesize())
	vec := make([]byte, (st.Size()+page-1)/page)
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)),
		uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		b.Fatalf("mincore %s: %v", path, errno)
	}
	var n int64
	for _, v := range vec {
		n += int64(v & 1)
	}
	return n * page
}

// ext4Image makes a 1 GiB ext4 disk image holding a 256 MiB file "data".
func ext4Image(b *testing.B) string {
	b.Helper()
	mkfs := needTool(b, "mkfs.ext4")
	path := filepath.Join(b.TempDir(), "ext4.img")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		b.Fatal(err)
	}
	if err := os.Truncate(path, 1<<30); err != nil {
		b.Fatal(err)
	}
	if out, err := exec.Command(mkfs, "-q", "-F", path).CombinedOutput(); err != nil {
		b.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	l, err := attachLoop(context.Background(), f, loopConfig{blockSize: 4096})
	if err != nil {
		b.Fatal(err)
	}
	defer l.detach(context.Background())
	mnt := mountExt4(b, l.path, false)
	out, err := os.Create(filepath.Join(mnt, "data"))
	if err != nil {
		b.Fatal(err)
	}
	if _, err := io.CopyN(out, rand.Reader, 256<<20); err != nil {
		b.Fatal(err)
	}
	if err := out.Close(); err != nil {
		b.Fatal(err)
	}
	unmount(b, mnt)
	return path
}

// BenchmarkDeviceCaching reads a 256 MiB file through ext4 on each kind of
// device, from cold caches, and reports how many MiB of it each layer then
// holds in the page cache: ext4's file, the FUSE image file, and the local
// image file the daemon (or passthrough, or a plain loop) reads. Gated like
// BenchmarkDevice.
func BenchmarkDeviceCaching(b *testing.B) {
	if os.Getenv(benchEnvVar) != "1" {
		b.Skipf("set %s=1 to run the device benchmarks", benchEnvVar)
	}
	needKernel(b)
	path := ext4Image(b)
	loopDIO := DefaultTuning()
	loopDIO.LoopDirectIO = true
	def := DefaultTuning()
	for _, v := range []struct {
		name   string
		tuning *Tuning // nil: plain loop device
		local  bool
	}{
		{"plain-loop", nil, false},
		{"default", &def, false},
		{"loop-dio", &loopDIO, false},
		{"local-passthrough", &def, true},
	} {
		b.Run(v.name, func(b *testing.B) {
			for b.Loop() {
				fuse, ext, local := cachedLayers(b, path, v.tuning, v.local)
				b.ReportMetric(float64(ext)/(1<<20), "ext4-MiB")
				b.ReportMetric(float64(fuse)/(1<<20), "fuse-MiB")
				b.ReportMetric(float64(local)/(1<<20), "local-MiB")
			}
		})
	}
}

// cachedLayers attaches the ext4 image at path, reads its data file from
// cold caches and returns what each layer caches of it.
func cachedLayers(b *testing.B, path string, t *Tuning, local bool) (fuse, ext, loc int64) {
	ctx := context.Background()
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		b.Fatal(err)
	}
	var dev, fuseFile string
	if t == nil {
		l, err := attachLoop(ctx, f, loopConfig{readOnly: true, blockSize: 4096})
		if err != nil {
			b.Fatal(err)
		}
		defer l.detach(ctx)
		dev = l.path
	} else {
		var img Image = NewImage(f, 1<<30)
		if local {
			fi, err := OpenFileImage(path)
			if err != nil {
				b.Fatal(err)
			}
			defer fi.Close()
			img = fi
		}
		dir := filepath.Join(b.TempDir(), "fuse")
		d, err := FUSELoop{}.Attach(ctx, img, Options{Tuning: t, MountDir: dir})
		if err != nil {
			b.Fatal(err)
		}
		defer d.Close()
		dev, fuseFile = d.Path(), filepath.Join(dir, imageFileName)
	}
	mnt := mountExt4(b, dev, true)
	defer unmount(b, mnt)
	data, err := os.Open(filepath.Join(mnt, "data"))
	if err != nil {
		b.Fatal(err)
	}
	defer data.Close()
	if _, err := io.Copy(io.Discard, data); err != nil {
		b.Fatal(err)
	}
	if fuseFile != "" && !local {
		fuse = residentBytes(b, fuseFile)
	}
	return fuse, residentBytes(b, data.Name()), residentBytes(b, path)
}
