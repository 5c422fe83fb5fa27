package blobcache_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/obdtrace/obdtrace/internal/testutil"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/blobcache"
	"golang.org/x/sys/unix"
)

// TestFullDiskReadsThrough fills the cache's file system (a real tmpfs of
// 1 MiB) after the blob is opened: reads of the upstream hello-world layer
// from a real registry must still return its bytes, straight from the
// registry, and once space is freed and the retry time has passed the
// cache stores again.
func TestFullDiskReadsThrough(t *testing.T) {
	testutil.RequireRoot(t, "mounting a tmpfs")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, img, want := helloWorldLayer(ctx, t)
	layer := img.Layers[0]

	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	cache, err := blobcache.Open(filepath.Join(dir, "cache"), blobcache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	const retry = 200 * time.Millisecond
	blobcache.SetStorageRetry(cache, retry)
	blob, err := cache.Blob(layer.Digest, layer.Size, img.Repo)
	if err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(dir, "filler")
	fill(t, filler)

	got := make([]byte, layer.Size)
	for off := int64(0); off < layer.Size; off += 100_000 { // unaligned reads
		n := min(100_000, layer.Size-off)
		if _, err := blob.ReadAtContext(ctx, got[off:off+n], off); err != nil {
			t.Fatalf("read [%d, %d) with the disk full: %v", off, off+n, err)
		}
	}
	if !bytes.Equal(got, want) {
		t.Fatal("bytes read with the disk full differ from the blob")
	}
	st := cache.Stats()
	if st.UncachedBytes < layer.Size || st.IOErrors == 0 || st.UsedBytes != 0 {
		t.Errorf("disk full: %d uncached bytes (want >= %d), %d I/O errors (want > 0), %d bytes cached (want 0)",
			st.UncachedBytes, layer.Size, st.IOErrors, st.UsedBytes)
	}
	if err := blob.Prefetch(ctx, 0, 4096); !errors.Is(err, blobcache.ErrStorage) {
		t.Errorf("prefetch with the disk full: %v, want ErrStorage", err)
	}

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	time.Sleep(retry)
	clear(got)
	if _, err := blob.ReadAtContext(ctx, got, 0); err != nil {
		t.Fatalf("read after space was freed: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("bytes read after space was freed differ from the blob")
	}
	if after := cache.Stats(); after.UsedBytes == 0 || after.UncachedBytes != st.UncachedBytes {
		t.Errorf("after space was freed: %d bytes cached (want > 0), %d uncached (want still %d)",
			after.UsedBytes, after.UncachedBytes, st.UncachedBytes)
	}
}

// fill writes path until its file system is full.
func fill(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := make([]byte, 4096)
	for i := 0; ; i++ {
		if _, err := f.Write(chunk); err != nil {
			if !errors.Is(err, unix.ENOSPC) {
				t.Fatalf("filling %s: %v", path, err)
			}
			return
		}
		if i > 1<<20 {
			t.Fatal("file system never filled: not a size-limited tmpfs? (" + strconv.Itoa(i) + " pages written)")
		}
	}
}
