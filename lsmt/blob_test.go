package lsmt_test

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/obdtrace/obdtrace/lsmt"
	"github.com/obdtrace/obdtrace/lsmt/tarwrap"
	"github.com/obdtrace/obdtrace/lsmt/zfile"
)

// TestBlobRoundTrip writes random data into a writable layer, commits it,
// compresses it into a ZFile, wraps it in tar, and checks that the blob
// opened back reads exactly like the reference.
func TestBlobRoundTrip(t *testing.T) {
	const size = 6 << 20
	rng := rand.New(rand.NewPCG(5, 6))
	ref := make([]byte, size)
	dir := t.TempDir()
	w, err := lsmt.CreateWritable(filepath.Join(dir, "data"), filepath.Join(dir, "index"),
		lsmt.WritableOptions{VirtualSize: size})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	for range 300 {
		n := (1 + rng.Int64N(40)) * lsmt.SectorSize
		off := rng.Int64N((size-n)/lsmt.SectorSize) * lsmt.SectorSize
		if rng.IntN(6) == 0 {
			if err := w.Discard(off, n); err != nil {
				t.Fatal(err)
			}
			clear(ref[off : off+n])
			continue
		}
		p := make([]byte, n)
		// Half random, half text-like, so blocks of both kinds get compressed.
		for i := range p {
			if i < len(p)/2 {
				p[i] = byte(rng.Uint32())
			} else {
				p[i] = "overlaybd "[i%10]
			}
		}
		if _, err := w.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(ref[off:], p)
	}
	var committed bytes.Buffer
	if err := w.Commit(&committed, lsmt.CommitArgs{}); err != nil {
		t.Fatal(err)
	}

	for _, alg := range []zfile.Algorithm{zfile.LZ4, zfile.ZSTD} {
		for _, bs := range []int{4 << 10, 16 << 10, 64 << 10} {
			for _, form := range []tarwrap.Format{tarwrap.FormatPAX, tarwrap.FormatUSTAR} {
				t.Run(fmt.Sprintf("%v/%dK/%v", alg, bs>>10, form), func(t *testing.T) {
					var z bytes.Buffer
					zw, err := zfile.NewWriter(&z, zfile.Options{Algorithm: alg, BlockSize: bs})
					if err != nil {
						t.Fatal(err)
					}
					if _, err := io.Copy(zw, bytes.NewReader(committed.Bytes())); err != nil {
						t.Fatal(err)
					}
					if err := zw.Close(); err != nil {
						t.Fatal(err)
					}
					var blob bytes.Buffer
					if err := tarwrap.Write(&blob, "overlaybd.commit", &z, int64(z.Len()), tarwrap.WithFormat(form)); err != nil {
						t.Fatal(err)
					}
					b, err := lsmt.OpenBlob(bytes.NewReader(blob.Bytes()), int64(blob.Len()))
					if err != nil {
						t.Fatal(err)
					}
					defer b.Close()
					if !b.TarWrapped || b.ZFile == nil || b.ZFile.Algorithm() != alg || b.ZFile.BlockSize() != bs {
						t.Fatalf("wrappers: tar %v zfile %v", b.TarWrapped, b.ZFile != nil)
					}
					got := make([]byte, size)
					if _, err := b.ReadAt(got, 0); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, ref) {
						t.Fatal("blob reads differ from the reference")
					}
					for range 50 {
						off := rng.Int64N(size)
						n := min(rng.Int64N(100000)+1, size-off)
						if _, err := b.ReadAt(got[:n], off); err != nil || !bytes.Equal(got[:n], ref[off:off+n]) {
							t.Fatalf("ReadAt(%d, %d) differs (err %v)", off, n, err)
						}
					}
				})
			}
		}
	}
}

// TestBlobRange checks that the blob range named for layer bytes is enough
// to read them: with every other byte of the compressed data area
// overwritten, reading those layer bytes still succeeds (block CRCs would
// catch anything read from outside the range).
func TestBlobRange(t *testing.T) {
	dir := t.TempDir()
	w, err := lsmt.CreateWritable(filepath.Join(dir, "d"), filepath.Join(dir, "i"), lsmt.WritableOptions{VirtualSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if _, err := w.WriteAt(bytes.Repeat([]byte("0123456789abcdef"), 4<<16), 0); err != nil {
		t.Fatal(err)
	}
	var committed, z, blob bytes.Buffer
	if err := w.Commit(&committed, lsmt.CommitArgs{}); err != nil {
		t.Fatal(err)
	}
	zw, err := zfile.NewWriter(&z, zfile.Options{})
	if err != nil {
		t.Fatal(err)
	}
	zw.Write(committed.Bytes())
	zw.Close()
	if err := tarwrap.Write(&blob, "overlaybd.commit", &z, int64(z.Len())); err != nil {
		t.Fatal(err)
	}
	b, err := lsmt.OpenBlob(bytes.NewReader(blob.Bytes()), int64(blob.Len()))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	dataStart := b.PayloadOffset + 512
	layout := b.ZFile.Header()
	if tr, ok := b.ZFile.Trailer(); ok {
		layout = tr
	}
	dataEnd := b.PayloadOffset + int64(layout.IndexOffset)
	rng := rand.New(rand.NewPCG(7, 7))
	for range 50 {
		off := rng.Int64N(b.Size() - 1)
		n := min(1+rng.Int64N(200000), b.Size()-off)
		start, end, err := b.BlobRange(off, n)
		if err != nil || start < dataStart || end > dataEnd || start >= end {
			t.Fatalf("BlobRange(%d, %d) = [%d, %d), %v; data area [%d, %d)", off, n, start, end, err, dataStart, dataEnd)
		}
		damaged := bytes.Clone(blob.Bytes())
		for i := dataStart; i < dataEnd; i++ {
			if i < start || i >= end {
				damaged[i] = 0xA5
			}
		}
		zr, err := zfile.NewReader(io.NewSectionReader(bytes.NewReader(damaged), b.PayloadOffset, b.PayloadSize), b.PayloadSize)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, n)
		if _, err := zr.ReadAt(got, off); err != nil {
			t.Fatalf("layer bytes [%d, +%d) need more than blob range [%d, %d): %v", off, n, start, end, err)
		}
		if !bytes.Equal(got, committed.Bytes()[off:off+n]) {
			t.Fatalf("layer bytes [%d, +%d) differ", off, n)
		}
	}
	if _, _, err := b.BlobRange(b.Size(), 1); err == nil {
		t.Error("range past the layer accepted")
	}
}
