package convert

import (
	"path/filepath"
	"testing"
)

// BenchmarkConvertDebian converts the Debian test image (a debootstrap
// minbase rootfs and a small top layer) with an empty cache each time and
// reports the throughput in MiB of layer tar per second, end to end:
// decompressing, applying through ext4, normalising, committing and
// compressing, writing the result to an OCI layout.
func BenchmarkConvertDebian(b *testing.B) {
	needKernel(b)
	rootfs := debianRootfsTar(b)
	work := b.TempDir()
	top := filepath.Join(work, "top.tar")
	writeTar(b, top, debianTopLayer(1))
	layout := filepath.Join(work, "src")
	writeTestLayout(b, layout, "debian", []testLayer{{rootfs, gzipped}, {top, zstdCompressed}}, nil)
	var tarBytes int64
	b.ResetTimer()
	for b.Loop() {
		b.StopTimer()
		c := newTestConverter(b, "", nil)
		out := "oci:" + b.TempDir() + ":debian"
		b.StartTimer()
		res := convertOK(b, c, "oci:"+layout+":debian", out)
		tarBytes = 0
		for _, l := range res.Images[0].Layers {
			tarBytes += l.TarBytes
		}
	}
	b.SetBytes(tarBytes)
	b.ReportMetric(float64(tarBytes)*float64(b.N)/(1<<20)/b.Elapsed().Seconds(), "MiB/s")
}
