package blobcache

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
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
// fdatasync runs in the background flusher, off the read's path). The
// reads touch every window in order, which the readahead would take for a
// sequential reader, so it is off.
func BenchmarkColdFill(b *testing.B) {
	c := openCache(b, b.TempDir(), Options{Readahead: -1})
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

// BenchmarkSequentialCold reads a 64 MiB blob (but its last MiB, so no
// digest check runs) in 1 MiB requests with a cold cache, from a source that answers each range after
// 5 ms plus 1 ns a byte (a local registry's latency, 1 GB/s), with the
// sequential readahead on and off. Off, every 256 KiB window costs a
// round trip.
func BenchmarkSequentialCold(b *testing.B) {
	const size = 64 * mib
	source := FetcherFunc(func(ctx context.Context, _ digest.Digest, off int64, p []byte) error {
		t := time.NewTimer(5*time.Millisecond + time.Duration(len(p)))
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		}
		for i := 0; i < len(p); i += 4096 {
			p[i] = byte(off + int64(i))
		}
		return nil
	})
	for _, bc := range []struct {
		name string
		ra   int64
	}{{"readahead", 0}, {"no-readahead", -1}} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(size - mib)
			p := make([]byte, mib)
			for i := 0; b.Loop(); i++ {
				c := openCache(b, b.TempDir(), Options{Readahead: bc.ra})
				blob, err := c.Blob(digest.FromString(fmt.Sprint("seq", i)), size, source)
				if err != nil {
					b.Fatal(err)
				}
				for off := int64(0); off < size-mib; off += mib {
					if _, err := blob.ReadAt(p, off); err != nil {
						b.Fatal(err)
					}
				}
				if err := c.Close(); err != nil { // waits for the readahead
					b.Fatal(err)
				}
			}
		})
	}
}
