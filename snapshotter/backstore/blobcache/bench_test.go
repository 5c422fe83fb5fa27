package blobcache

import (
	"context"
	"github.com/opencontainers/go-digest"
	"math/rand/v2"
	"testing"
)

// warmBlob returns a fully cached 64 MiB blob.
func warmBlob(b *testing.B) *Blob {
	b.Helper()
	m := newMemFetcher(64*mib, 42)
	c := openCache(b, b.TempDir(), Options{})
	blob := openBlob(b, c, m, nil)
	if err := blob.Prefetch(context.Background(), 0, blob.Size()); err != nil {
		b.Fatal(err)
	}
	c.background.Wait()
	if !blob.Complete() {
		b.Fatal("blob not complete after a full prefetch")
	}
	return blob
}

// benchWarmRead measures random aligned reads of size n from a fully cached
// blob: pread from the page cache plus the CRC check of each block touched.
func benchWarmRead(b *testing.B, n int) {
	blob := warmBlob(b)
	fetches := blob.c.Stats().Fetches
	p := make([]byte, n)
	r := rand.New(rand.NewPCG(1, 1))
	slots := blob.Size() / int64(n)
	b.SetBytes(int64(n))
	b.ResetTimer()
	for b.Loop() {
		if _, err := blob.ReadAt(p, r.Int64N(slots)*int64(n)); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if blob.c.Stats().Fetches != fetches {
		b.Fatal("a warm read fetched")
	}
}

func BenchmarkWarmReadAt64K(b *testing.B) { benchWarmRead(b, 64*kib) }
func BenchmarkWarmReadAt4K(b *testing.B)  { benchWarmRead(b, 4*kib) }
func BenchmarkWarmReadAt1M(b *testing.B)  { benchWarmRead(b, 1*mib) }

// BenchmarkWarmReadAt64KParallel reads from GOMAXPROCS goroutines at once.
func BenchmarkWarmReadAt64KParallel(b *testing.B) {
	blob := warmBlob(b)
	slots := blob.Size() / (64 * kib)
	b.SetBytes(64 * kib)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		p := make([]byte, 64*kib)
		r := rand.New(rand.NewPCG(rand.Uint64(), 1))
		for pb.Next() {
			if _, err := blob.ReadAt(p, r.Int64N(slots)*64*kib); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkPageCRC64K is the verification cost alone for 64 KiB: the CRC32C
// of its sixteen 4 KiB pages, as a read checks them.
func BenchmarkPageCRC64K(b *testing.B) {
	p := make([]byte, 64*kib)
	b.SetBytes(int64(len(p)))
	for b.Loop() {
		for k := 0; k < len(p); k += pageSize {
			blockCRC(p[k : k+pageSize])
		}
	}
}

// BenchmarkColdFill measures the miss path without a network: fetch from
// memory, write, checksum and publish one 256 KiB window per read (the
// fdatasync runs in the background flusher, off the read's path).
func BenchmarkColdFill(b *testing.B) {
	c := openCache(b, b.TempDir(), Options{})
	pattern := FetcherFunc(func(_ context.Context, _ digest.Digest, off int64, p []byte) error {
		for i := range p {
			p[i] = byte(off + int64(i))
		}
		return nil
	})
	// Never read to the end, so no digest check runs.
	blob, err := c.Blob(digest.FromString("cold"), 1<<38, pattern)
	if err != nil {
		b.Fatal(err)
	}
	p := make([]byte, 4*kib)
	b.SetBytes(DefaultRefillSize)
	var off int64
	for b.Loop() {
		if _, err := blob.ReadAt(p, off); err != nil {
			b.Fatal(err)
		}
		off += DefaultRefillSize
	}
}
