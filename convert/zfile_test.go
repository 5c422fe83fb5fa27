package convert

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/lsmt"
	"github.com/obdtrace/obdtrace/lsmt/zfile"
)

func TestCheckZFileOptions(t *testing.T) {
	for _, o := range []zfile.Options{
		{},
		{Algorithm: zfile.LZ4, BlockSize: 4 << 10},
		{Algorithm: zfile.ZSTD, BlockSize: 64 << 10, Level: 19},
		{Algorithm: zfile.ZSTD, BlockSize: 16 << 10},
	} {
		if err := checkZFileOptions(o); err != nil {
			t.Errorf("%+v: %v", o, err)
		}
	}
	for _, o := range []zfile.Options{
		{Algorithm: 3},
		{BlockSize: 2 << 10},
		{BlockSize: 128 << 10},
		{BlockSize: 12 << 10},
		{Algorithm: zfile.ZSTD, Level: 23},
		{Algorithm: zfile.ZSTD, Level: -1},
	} {
		if err := checkZFileOptions(o); !errors.Is(err, ErrOptions) {
			t.Errorf("%+v: %v, want ErrOptions", o, err)
		}
	}
	if _, err := New(Options{Mkfs: true, CacheDir: t.TempDir(), ZFile: zfile.Options{BlockSize: 3000}}); !errors.Is(err, ErrOptions) {
		t.Errorf("New with a 3000-byte block: %v, want ErrOptions", err)
	}
	if zfileKey(zfile.Options{}) != "" || zfileKey(zfile.Options{Algorithm: zfile.ZSTD}) == "" {
		t.Error("zfileKey: the default must keep existing cache keys, others must not share them")
	}
}

// TestZFileKey checks that options writing the same blob share a cache key
// and that others do not.
func TestZFileKey(t *testing.T) {
	for _, o := range []zfile.Options{
		{Algorithm: zfile.LZ4},
		{BlockSize: 4 << 10},
		{Algorithm: zfile.LZ4, BlockSize: 4 << 10},
		{Algorithm: zfile.LZ4, BlockSize: 4 << 10, Level: 7}, // LZ4 has no levels
	} {
		if k := zfileKey(o); k != "" {
			t.Errorf("%+v: key %q, want upstream's (none)", o, k)
		}
	}
	zstd64 := zfileKey(zfile.Options{Algorithm: zfile.ZSTD, BlockSize: 64 << 10})
	if zstd64 != " zfile=zstd/65536/0/false" {
		t.Errorf("zstd, 64 KiB: key %q changed: existing caches would be rebuilt", zstd64)
	}
	if k := zfileKey(zfile.Options{Algorithm: zfile.ZSTD, BlockSize: 64 << 10, Level: 3}); k != zstd64 {
		t.Errorf("zstd level 3 (the default): key %q, want %q", k, zstd64)
	}
	seen := map[string]zfile.Options{"": {}}
	for _, o := range []zfile.Options{
		{NoVerify: true},
		{BlockSize: 8 << 10},
		{Algorithm: zfile.ZSTD},
		{Algorithm: zfile.ZSTD, BlockSize: 64 << 10},
		{Algorithm: zfile.ZSTD, BlockSize: 64 << 10, Level: 9},
	} {
		k := zfileKey(o)
		if prev, ok := seen[k]; ok {
			t.Errorf("%+v and %+v share key %q", o, prev, k)
		}
		seen[k] = o
	}
}

// TestHelloWorldZstd converts hello-world with zstd and 64 KiB blocks: the
// layer blob says so, /hello reads back right, and a converter with the
// default settings on the same cache builds its own blob instead of taking
// the zstd one.
func TestHelloWorldZstd(t *testing.T) {
	needKernel(t)
	src := "oci:" + testdata.OCILayout(t) + ":amd64"
	out := t.TempDir()
	cache := t.TempDir()
	zopts := zfile.Options{Algorithm: zfile.ZSTD, BlockSize: 64 << 10}
	c := newTestConverter(t, cache, func(o *Options) { o.ZFile = zopts })
	res := convertOK(t, c, src, "oci:"+out+":hello")
	layer := res.Images[0].Layers[1]
	f, err := os.Open(filepath.Join(out, "blobs", "sha256", layer.Desc.Digest.Encoded()))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	blob, err := lsmt.OpenBlob(f, layer.Desc.Size)
	if err != nil {
		t.Fatal(err)
	}
	info := blob.Info(layer.Desc.Size)
	if info.ZFile == nil || info.ZFile.Algorithm != "zstd" || info.ZFile.BlockSize != 64<<10 || !info.ZFile.Verify {
		t.Errorf("layer blob ZFile %+v, want zstd, 64 KiB blocks, CRCs", info.ZFile)
	}
	mnt := mountLayout(t, out, resolveLayout(t, out, "hello"))
	data, err := os.ReadFile(filepath.Join(mnt, "hello"))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	if got := hex.EncodeToString(sum[:]); got != testdata.HelloSHA256 {
		t.Errorf("/hello has sha256 %s, want %s", got, testdata.HelloSHA256)
	}
	lz4 := convertOK(t, newTestConverter(t, cache, nil), src, "oci:"+t.TempDir()+":hello")
	if l := lz4.Images[0].Layers[1]; l.Cached || l.Desc.Digest == layer.Desc.Digest {
		t.Errorf("default settings reused the zstd layer: cached %v, digest %s", l.Cached, l.Desc.Digest)
	}
}
