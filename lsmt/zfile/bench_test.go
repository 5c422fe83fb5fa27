package zfile

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

// benchReadAt measures 64 KiB reads from a 64 MiB ZFile held in memory, at
// sequential offsets and at random unaligned ones (which cut a block at
// each end). Run with -cpu 1 for the per-core figure; the target for LZ4 is
// 1.5 GB/s of uncompressed output.
func benchReadAt(b *testing.B, opts Options) {
	const size, readLen = 64 << 20, 64 << 10
	data := genData(42, size)
	zf := compress(b, data, opts)
	z, err := NewReader(bytes.NewReader(zf), int64(len(zf)))
	if err != nil {
		b.Fatal(err)
	}
	defer z.Close()
	ratio := float64(size) / float64(len(zf))
	b.Run("sequential", func(b *testing.B) {
		buf := make([]byte, readLen)
		b.SetBytes(readLen)
		off := int64(0)
		for b.Loop() {
			if _, err := z.ReadAt(buf, off); err != nil {
				b.Fatal(err)
			}
			off = (off + readLen) % size
		}
		b.ReportMetric(ratio, "ratio")
	})
	b.Run("random", func(b *testing.B) {
		buf := make([]byte, readLen)
		rng := rand.New(rand.NewPCG(1, 2))
		b.SetBytes(readLen)
		for b.Loop() {
			if _, err := z.ReadAt(buf, rng.Int64N(size-readLen)); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(ratio, "ratio")
	})
}

func BenchmarkReadAtLZ4(b *testing.B) { benchReadAt(b, Options{}) }

func BenchmarkReadAtZSTD(b *testing.B) { benchReadAt(b, Options{Algorithm: ZSTD}) }

// BenchmarkWriteLZ4 measures compression with upstream's settings.
func BenchmarkWriteLZ4(b *testing.B) {
	data := genData(43, 16<<20)
	b.SetBytes(int64(len(data)))
	var out memFile
	for b.Loop() {
		out.b, out.pos = out.b[:0], 0
		zw, err := NewWriter(&out, Options{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := zw.Write(data); err != nil {
			b.Fatal(err)
		}
		if err := zw.Close(); err != nil {
			b.Fatal(err)
		}
	}
}
