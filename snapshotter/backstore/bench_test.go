package backstore

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
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
// registry, in the same run.
func BenchmarkColdSequentialRead(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	const size = 256 << 20
	work := b.TempDir()
	reg := registry.Start(b, registry.Options{})
	client, err := regclient.New(regclient.Options{PlainHTTP: []string{reg.Host}})
	if err != nil {
		b.Fatal(err)
	}
	ref := reg.Host + "/big:latest"
	blobSize := pushLayerImage(b, client, ref, bigLayer(b, work, size))
	img0, err := client.Resolve(context.Background(), ref)
	if err != nil {
		b.Fatal(err)
	}
	blobURL := img0.Repo.BlobURL() + "/" + img0.Layers[0].Digest.String()
	base := testdata.Baselayer(b)

	// The registry's own latency per range request bounds any reader that
	// fetches one window at a time.
	p256 := make([]byte, 256<<10)
	start := time.Now()
	for k := int64(0); k < 50; k++ {
		if err := img0.Repo.FetchRange(context.Background(), img0.Layers[0].Digest, k*256<<10, p256); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(time.Since(start).Microseconds())/50/1000, "ms/256KiB-GET")

	var rawBPS, coldBPS float64
	for i := 0; i < b.N; i++ {
		// Raw: one GET of the whole blob.
		start = time.Now()
		resp, err := http.Get(blobURL)
		if err != nil {
			b.Fatal(err)
		}
		n, _ := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		rawBPS += float64(n) / time.Since(start).Seconds()

		// Cold: sequential 1 MiB reads of the device over the layer's data.
		cache, err := blobcache.Open(filepath.Join(work, "cache"+strconv.Itoa(i)), blobcache.Options{})
		if err != nil {
			b.Fatal(err)
		}
		img, err := OpenImage(context.Background(), client, cache, ref, OpenOptions{Baselayer: base})
		if err != nil {
			b.Fatal(err)
		}
		dev, err := device.FUSELoop{}.Attach(context.Background(), img, device.Options{})
		if err != nil {
			b.Fatal(err)
		}
		f, err := os.OpenFile(dev.Path(), os.O_RDONLY|unix.O_DIRECT, 0)
		if err != nil {
			b.Fatal(err)
		}
		buf, _ := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
		before := cache.Stats().BytesFetched
		start = time.Now()
		for off := int64(0); off < size; off += 1 << 20 {
			if _, err := f.ReadAt(buf, off); err != nil {
				b.Fatal(err)
			}
		}
		elapsed := time.Since(start)
		fetched := cache.Stats().BytesFetched - before
		coldBPS += float64(fetched) / elapsed.Seconds()
		unix.Munmap(buf)
		f.Close()
		dev.Close()
		img.Close()
		cache.Close()
		if fetched < blobSize*9/10 {
			b.Fatalf("fetched %d of a %d-byte blob", fetched, blobSize)
		}
	}
	b.ReportMetric(rawBPS/float64(b.N)/1e6, "raw-MB/s")
	b.ReportMetric(coldBPS/float64(b.N)/1e6, "cold-MB/s")
	b.ReportMetric(coldBPS/rawBPS, "ratio")
}

func ocispecVersioned() specs.Versioned { return specs.Versioned{SchemaVersion: 2} }
