package convert

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/internal/testutil"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/lsmt"
	"github.com/obdtrace/obdtrace/recorder/image"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/device"
)

// needKernel fails under CI and skips elsewhere unless the test can use
// loop devices, FUSE and mount (root) and the e2fsprogs tools.
func needKernel(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("kernel test: skipped with -short")
	}
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root")
	}
	for _, p := range []string{"/dev/fuse", "/dev/loop-control"} {
		if _, err := os.Stat(p); err != nil {
			missing = append(missing, p)
		}
	}
	for _, tool := range []string{"mkfs.ext4", "e2fsck"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if len(missing) == 0 {
		return
	}
	testutil.Missing(t, "conversion tests need %s", strings.Join(missing, ", "))
}

// newTestConverter returns a converter with a fresh cache (or cacheDir)
// on the shared baselayer.
func newTestConverter(t testing.TB, cacheDir string, mod func(*Options)) *Converter {
	t.Helper()
	if cacheDir == "" {
		cacheDir = t.TempDir()
	}
	opts := Options{Baselayer: testdata.Baselayer(t), CacheDir: cacheDir, WorkDir: t.TempDir()}
	if mod != nil {
		mod(&opts)
	}
	c, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func convertOK(t testing.TB, c *Converter, src, dst string) *Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	res, err := c.Convert(ctx, src, dst)
	if err != nil {
		t.Fatalf("Convert(%s, %s): %v", src, dst, err)
	}
	return res
}

// layerDigests lists the layer digests of every image in a result.
func layerDigests(res *Result) []string {
	var out []string
	for _, img := range res.Images {
		for _, l := range img.Layers {
			out = append(out, l.Desc.Digest.String())
		}
	}
	return out
}

// mountLayout mounts, read-only, the image a layout's manifest names: each
// layer blob opened with lsmt.OpenBlob, stacked bottom first, attached
// through the FUSE+loop frontend, mounted with -o ro,noload. Everything is
// torn down when the test ends.
func mountLayout(t testing.TB, dir string, manifest ocispec.Descriptor) string {
	t.Helper()
	var m ocispec.Manifest
	readJSONFile(t, blobFile(dir, manifest), &m)
	var layers []lsmt.StackLayer
	for _, l := range m.Layers {
		f, err := os.Open(blobFile(dir, l))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		b, err := lsmt.OpenBlob(f, l.Size)
		if err != nil {
			t.Fatalf("OpenBlob(%s): %v", l.Digest, err)
		}
		layers = append(layers, b)
	}
	stack, err := lsmt.NewStack(layers)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d, err := device.FUSELoop{}.Attach(ctx, device.NewImage(stack, stack.VirtualSize()),
		device.Options{MountDir: filepath.Join(t.TempDir(), "fuse")})
	if err != nil {
		t.Fatalf("attach: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	if out, err := exec.Command("e2fsck", "-fn", d.Path()).CombinedOutput(); err != nil {
		t.Errorf("e2fsck -fn on the converted image: %v\n%s", err, out)
	}
	mnt := t.TempDir()
	if err := unix.Mount(d.Path(), mnt, "ext4", unix.MS_RDONLY, "noload"); err != nil {
		t.Fatalf("mount -o ro,noload %s: %v", d.Path(), err)
	}
	t.Cleanup(func() {
		if err := unmount(mnt); err != nil {
			t.Error(err)
		}
	})
	return mnt
}

func blobFile(dir string, d ocispec.Descriptor) string {
	return filepath.Join(dir, "blobs", d.Digest.Algorithm().String(), d.Digest.Encoded())
}

func readJSONFile(t testing.TB, path string, v any) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// resolveLayout finds ref in a layout's index.json.
func resolveLayout(t testing.TB, dir, ref string) ocispec.Descriptor {
	t.Helper()
	l, err := image.OpenLayout(dir)
	if err != nil {
		t.Fatal(err)
	}
	d, err := l.ResolveManifest(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	return d
}
