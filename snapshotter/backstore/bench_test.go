package backstore

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/internal/wanproxy"
	"github.com/obdtrace/obdtrace/lsmt"
	"github.com/obdtrace/obdtrace/lsmt/tarwrap"
	"github.com/obdtrace/obdtrace/lsmt/zfile"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/blobcache"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/device"
	regclient "github.com/obdtrace/obdtrace/snapshotter/backstore/registry"
)

// bigLayer writes an overlaybd layer blob holding size bytes of
// half-compressible data at the start of the disk and returns its path.
func bigLayer(b *testing.B, dir string, size int64) string {
	b.Helper()
	w, err := lsmt.CreateWritable(filepath.Join(dir, "d"), filepath.Join(dir, "i"), lsmt.WritableOptions{VirtualSize: 64 << 30})
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	chunk := make([]byte, 4<<20)
	for off := int64(0); off < size; off += int64(len(chunk)) {
		for i := 0; i < len(chunk); i += 64 {
			if rng.IntN(2) == 0 {
				for j := i; j < i+64; j++ {
					chunk[j] = byte(rng.Uint32())
				}
			} else {
				copy(chunk[i:i+64], "ELF binaries and libraries compress about two to one, like this.")
			}
		}
		if _, err := w.WriteAt(chunk, off); err != nil {
			b.Fatal(err)
		}
	}
	lsmtPath, zPath, blobPath := filepath.Join(dir, "lsmt"), filepath.Join(dir, "zfile"), filepath.Join(dir, "blob")
	lf, _ := os.Create(lsmtPath)
	if err := w.Commit(lf, lsmt.CommitArgs{}); err != nil {
		b.Fatal(err)
	}
	w.Close()
	lf.Seek(0, io.SeekStart)
	zf, _ := os.Create(zPath)
	zw, _ := zfile.NewWriter(zf, zfile.Options{})
	if _, err := io.Copy(zw, lf); err != nil {
		b.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		b.Fatal(err)
	}
	lf.Close()
	st, _ := zf.Stat()
	zf.Seek(0, io.SeekStart)
	bf, _ := os.Create(blobPath)
	if err := tarwrap.Write(bf, tarwrap.CommitName, zf, st.Size()); err != nil {
		b.Fatal(err)
	}
	zf.Close()
	bf.Close()
	os.Remove(lsmtPath)
	os.Remove(zPath)
	return blobPath
}

// pushLayerImage pushes an image of one overlaybd layer and returns its ref.
func pushLayerImage(b *testing.B, client *regclient.Client, ref, blobPath string) int64 {
	b.Helper()
	ctx := context.Background()
	store, err := client.Store(ref)
	if err != nil {
		b.Fatal(err)
	}
	f, _ := os.Open(blobPath)
	defer f.Close()
	dgst, _ := digest.FromReader(f)
	st, _ := f.Stat()
	f.Seek(0, io.SeekStart)
	layer := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: dgst, Size: st.Size(),
		Annotations: map[string]string{AnnotationBlobDigest: dgst.String(), AnnotationBlobSize: strconv.FormatInt(st.Size(), 10), AnnotationVersion: "0.1.0"}}
	if err := store.WriteBlob(ctx, layer, f); err != nil {
		b.Fatal(err)
	}
	cfg, _ := json.Marshal(ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{dgst}}})
	cfgDesc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cfg), Size: int64(len(cfg))}
	if err := store.WriteBlob(ctx, cfgDesc, bytes.NewReader(cfg)); err != nil {
		b.Fatal(err)
	}
	m, _ := json.Marshal(ocispec.Manifest{Versioned: ocispecVersioned(), MediaType: ocispec.MediaTypeImageManifest, Config: cfgDesc, Layers: []ocispec.Descriptor{layer}})
	mDesc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(m), Size: int64(len(m))}
	if err := store.PutManifest(ctx, "latest", mDesc, m); err != nil {
		b.Fatal(err)
	}
	return st.Size()
}

// BenchmarkColdSequentialRead reads a 256 MiB layer sequentially through
// the device with a cold cache, from a local registry, and compares the
// blob bytes per second with a plain download of the blob from the same
// registry, in the same round. Each round also measures:
//   - cached: the device read again through a fresh FUSE mount over the now
//     complete cache: the device path alone (FUSE, loop, LSMT, ZFile
//     decompression, cache reads), which bounds the cold read;
//   - blob: the blob read sequentially in 1 MiB requests through a fresh
//     cache, without the device: the cache's fetch pipeline alone.
//
// Metrics: the MB/s are means over rounds, of blob bytes; ratio is the
// median of the per-round ratios cold/raw (ratio-min, ratio-max: their
// range), blob-ratio and cached-ratio the medians of blob/raw and
// cached/raw; raw-cpu-ms/MB and cold-cpu-ms/MB the machine's busy CPU time
// (all processes and the kernel, from /proc/stat) per MB of blob during
// the raw download and the cold read, means over rounds.
//
// OBD_BENCH_LINK_RATE (e.g. 1gbit) puts the registry behind the project's
// WAN proxy at that rate, with OBD_BENCH_LINK_RTT (default 0) added per
// request, for both the raw download and the reads: a registry across a
// network instead of one sharing this machine's CPUs.
func BenchmarkColdSequentialRead(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	const size = 256 << 20
	work := b.TempDir()
	reg := registry.Start(b, registry.Options{})
	host := linkTo(b, reg.Host)
	client, err := regclient.New(regclient.Options{PlainHTTP: []string{host}})
	if err != nil {
		b.Fatal(err)
	}
	ref := host + "/big:latest"
	blobSize := pushLayerImage(b, client, ref, bigLayer(b, work, size))
	img0, err := client.Resolve(context.Background(), ref)
	if err != nil {
		b.Fatal(err)
	}
	layer := img0.Layers[0]
	blobURL := img0.Repo.BlobURL() + "/" + layer.Digest.String()
	base := testdata.Baselayer(b)

	// The registry's own latency per range request: what a reader that
	// fetches one window at a time waits for each 256 KiB.
	p256 := make([]byte, 256<<10)
	start := time.Now()
	for k := int64(0); k < 50; k++ {
		if err := img0.Repo.FetchRange(context.Background(), layer.Digest, k*256<<10, p256); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(time.Since(start).Microseconds())/50/1000, "ms/256KiB-GET")

	var sum [4]float64 // raw, cold, cached, blob
	var ratios [3][]float64
	var cpu [2]time.Duration // raw, cold
	var st blobcache.Stats
	for i := 0; i < b.N; i++ {
		busy := busyCPU(b)
		raw := rawDownload(b, blobURL)
		rawCPU := busyCPU(b) - busy
		dir := filepath.Join(work, "cache"+strconv.Itoa(i))
		cache, err := blobcache.Open(dir, blobcache.Options{})
		if err != nil {
			b.Fatal(err)
		}
		// Cold: the layer's index is fetched at open, outside the timing.
		// The counters are read after Close, which waits for the fetch
		// that brought the last bytes to finish its bookkeeping; bytes
		// read ahead and never read do not count.
		before := cache.Stats().BytesFetched
		busy = busyCPU(b)
		elapsed := readDevice(b, client, cache, ref, base, size)
		if err := cache.Close(); err != nil {
			b.Fatal(err)
		}
		coldCPU := busyCPU(b) - busy
		cpu[0] += rawCPU
		cpu[1] += coldCPU
		st = cache.Stats()
		fetched := st.BytesFetched - before - st.ReadaheadUnusedBytes
		if fetched < blobSize*9/10 {
			b.Fatalf("fetched %d of a %d-byte blob", fetched, blobSize)
		}
		cold := float64(fetched) / elapsed.Seconds()
		if cache, err = blobcache.Open(dir, blobcache.Options{}); err != nil {
			b.Fatal(err)
		}
		cached := float64(fetched) / readDevice(b, client, cache, ref, base, size).Seconds()
		if err := cache.Close(); err != nil {
			b.Fatal(err)
		}
		if n := cache.Stats().BytesFetched; n != 0 {
			b.Fatalf("the cached pass fetched %d bytes", n)
		}
		os.RemoveAll(dir)
		blob := readBlob(b, img0.Repo, layer, filepath.Join(work, "blob"+strconv.Itoa(i)))
		b.Logf("round %d: raw %.0f MB/s, cold %.0f (%.2f), cached %.0f (%.2f), blob %.0f (%.2f); %d fetches, %d readahead bytes, %d unused; busy CPU per blob MB: raw %.2f ms, cold %.2f ms",
			i, raw/1e6, cold/1e6, cold/raw, cached/1e6, cached/raw, blob/1e6, blob/raw, st.Fetches, st.ReadaheadBytes, st.ReadaheadUnusedBytes,
			msPerMB(rawCPU, blobSize), msPerMB(coldCPU, blobSize))
		for k, v := range []float64{raw, cold, cached, blob} {
			sum[k] += v
		}
		for k, v := range []float64{cold, cached, blob} {
			ratios[k] = append(ratios[k], v/raw)
		}
	}
	for k := range ratios {
		slices.Sort(ratios[k])
	}
	n := float64(b.N)
	b.ReportMetric(sum[0]/n/1e6, "raw-MB/s")
	b.ReportMetric(sum[1]/n/1e6, "cold-MB/s")
	b.ReportMetric(sum[2]/n/1e6, "cached-MB/s")
	b.ReportMetric(sum[3]/n/1e6, "blob-MB/s")
	b.ReportMetric(ratios[0][b.N/2], "ratio")
	b.ReportMetric(ratios[0][0], "ratio-min")
	b.ReportMetric(ratios[0][b.N-1], "ratio-max")
	b.ReportMetric(ratios[1][b.N/2], "cached-ratio")
	b.ReportMetric(ratios[2][b.N/2], "blob-ratio")
	b.ReportMetric(float64(st.Fetches), "fetches")
	b.ReportMetric(msPerMB(cpu[0]/time.Duration(b.N), blobSize), "raw-cpu-ms/MB")
	b.ReportMetric(msPerMB(cpu[1]/time.Duration(b.N), blobSize), "cold-cpu-ms/MB")
}

// linkTo returns host, or with OBD_BENCH_LINK_RATE set, the address of a
// WAN proxy in front of it at that rate (and OBD_BENCH_LINK_RTT).
func linkTo(b *testing.B, host string) string {
	rateEnv := os.Getenv("OBD_BENCH_LINK_RATE")
	if rateEnv == "" {
		return host
	}
	rate, err := wanproxy.ParseRate(rateEnv)
	if err != nil {
		b.Fatal(err)
	}
	var rtt time.Duration
	if s := os.Getenv("OBD_BENCH_LINK_RTT"); s != "" {
		if rtt, err = time.ParseDuration(s); err != nil {
			b.Fatalf("OBD_BENCH_LINK_RTT=%q: %v", s, err)
		}
	}
	p, err := wanproxy.New(&url.URL{Scheme: "http", Host: host}, wanproxy.Options{BytesPerSecond: rate, RTT: rtt})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	addr, stop, err := p.Start(ctx, "127.0.0.1:0")
	if err != nil {
		cancel()
		b.Fatal(err)
	}
	b.Cleanup(func() {
		_ = stop()
		cancel()
	})
	b.Logf("registry behind a %s link (%d B/s), RTT %v", rateEnv, rate, rtt)
	return addr
}

// busyCPU is the machine's CPU time spent running since boot (user, nice,
// system, irq, softirq; not idle, iowait or steal), from the first line of
// /proc/stat: every process's and the kernel's, the registry and the loop
// worker included.
func busyCPU(b *testing.B) time.Duration {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		b.Fatal(err)
	}
	line, _, _ := strings.Cut(string(raw), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		b.Fatalf("/proc/stat: unexpected first line %q", line)
	}
	var ticks int64
	for _, v := range []string{f[1], f[2], f[3], f[6], f[7]} { // user, nice, system, irq, softirq
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			b.Fatalf("/proc/stat: %q: %v", line, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / 100 // USER_HZ
}

func msPerMB(d time.Duration, bytes int64) float64 {
	return float64(d) / float64(time.Millisecond) / (float64(bytes) / 1e6)
}

// readBlob reads the layer blob sequentially in 1 MiB requests through a
// new cache in dir and returns its bytes per second.
func readBlob(b *testing.B, repo *regclient.Repository, layer ocispec.Descriptor, dir string) float64 {
	b.Helper()
	cache, err := blobcache.Open(dir, blobcache.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	defer cache.Close()
	blob, err := cache.Blob(layer.Digest, layer.Size, repo)
	if err != nil {
		b.Fatal(err)
	}
	p := make([]byte, 1<<20)
	start := time.Now()
	for off := int64(0); off < layer.Size; off += int64(len(p)) {
		if _, err := blob.ReadAt(p, off); err != nil && err != io.EOF {
			b.Fatal(err)
		}
	}
	return float64(layer.Size) / time.Since(start).Seconds()
}

// rawDownload GETs the whole blob once and returns its bytes per second.
func rawDownload(b *testing.B, blobURL string) float64 {
	b.Helper()
	start := time.Now()
	resp, err := http.Get(blobURL)
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		b.Fatalf("GET %s: %s, %v", blobURL, resp.Status, err)
	}
	return float64(n) / time.Since(start).Seconds()
}

// readDevice opens the image through cache, attaches a fresh device and
// times sequential 1 MiB O_DIRECT reads of its first n bytes.
func readDevice(b *testing.B, client *regclient.Client, cache *blobcache.Cache, ref, base string, n int64) time.Duration {
	b.Helper()
	img, err := OpenImage(context.Background(), client, cache, ref, OpenOptions{Baselayer: base})
	if err != nil {
		b.Fatal(err)
	}
	defer img.Close()
	dev, err := device.FUSELoop{}.Attach(context.Background(), img, device.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer dev.Close()
	f, err := os.OpenFile(dev.Path(), os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf, err := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Munmap(buf)
	start := time.Now()
	for off := int64(0); off < n; off += int64(len(buf)) {
		if _, err := f.ReadAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	return time.Since(start)
}

func ocispecVersioned() specs.Versioned { return specs.Versioned{SchemaVersion: 2} }
