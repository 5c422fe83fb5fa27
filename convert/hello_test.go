package convert

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
)

// TestHelloWorld converts upstream's OCI hello-world (a docker-typed
// manifest in an OCI layout) and checks that the mounted image's /hello is
// the original binary, that converting again gives the same digests, and
// that a second converter on the same cache reuses the layer.
func TestHelloWorld(t *testing.T) {
	needKernel(t)
	src := "oci:" + testdata.OCILayout(t) + ":amd64"
	out := t.TempDir()
	c := newTestConverter(t, "", nil)
	res := convertOK(t, c, src, "oci:"+out+":hello")
	if len(res.Images) != 1 || len(res.Images[0].Layers) != 2 {
		t.Fatalf("want one image of two layers (baselayer, hello), got %+v", res.Images)
	}
	img := res.Images[0]
	if img.Layers[1].Cached || img.Layers[1].TarBytes == 0 {
		t.Errorf("the hello layer was not built: %+v", img.Layers[1])
	}
	mnt := mountLayout(t, out, resolveLayout(t, out, "hello"))
	data, err := os.ReadFile(filepath.Join(mnt, "hello"))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	if got := hex.EncodeToString(sum[:]); got != testdata.HelloSHA256 {
		t.Errorf("/hello has sha256 %s (%d bytes), want %s", got, len(data), testdata.HelloSHA256)
	}

	// A fresh cache: everything is built again, to the same bytes.
	again := convertOK(t, newTestConverter(t, "", nil), src, "oci:"+t.TempDir()+":hello")
	if !slices.Equal(layerDigests(res), layerDigests(again)) || again.Desc.Digest != res.Desc.Digest {
		t.Errorf("second conversion differs:\n%v %s\n%v %s", layerDigests(res), res.Desc.Digest,
			layerDigests(again), again.Desc.Digest)
	}
	// The same cache: the layer is taken from it.
	cached := convertOK(t, c, src, "oci:"+t.TempDir()+":hello")
	if !cached.Images[0].Layers[1].Cached || cached.Desc.Digest != res.Desc.Digest {
		t.Errorf("third conversion did not reuse the cached layer: %+v", cached.Images[0].Layers[1])
	}
}

// TestHelloWorldMkfs converts hello-world with the filesystem made in its
// first layer: one layer, no baselayer, a smaller disk, same digests when
// converted twice.
func TestHelloWorldMkfs(t *testing.T) {
	needKernel(t)
	src := "oci:" + testdata.OCILayout(t) + ":amd64"
	mkfs := func(o *Options) { o.Mkfs, o.Baselayer, o.VirtualSize = true, "", 8<<30 }
	out := t.TempDir()
	res := convertOK(t, newTestConverter(t, "", mkfs), src, "oci:"+out+":hello")
	if len(res.Images) != 1 || len(res.Images[0].Layers) != 1 {
		t.Fatalf("want one image of one layer, got %+v", res.Images)
	}
	mnt := mountLayout(t, out, resolveLayout(t, out, "hello"))
	data, err := os.ReadFile(filepath.Join(mnt, "hello"))
	if err != nil {
		t.Fatal(err)
	}
	if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != testdata.HelloSHA256 {
		t.Errorf("/hello differs from the source")
	}
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	if size := int64(st.Blocks) * st.Bsize; size > 8<<30 || size < 7<<30 {
		t.Errorf("filesystem of %d bytes, want about 8 GiB", size)
	}
	again := convertOK(t, newTestConverter(t, "", mkfs), src, "oci:"+t.TempDir()+":hello")
	if !slices.Equal(layerDigests(res), layerDigests(again)) {
		t.Errorf("mkfs conversions differ: %v, %v", layerDigests(res), layerDigests(again))
	}
}
