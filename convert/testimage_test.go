package convert

import (
	"archive/tar"
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/internal/testutil"
)

// testLayer is a layer tar of a test image and how to compress it.
type testLayer struct {
	tarPath     string
	compression compression
}

// writeTestLayout writes an OCI layout at dir holding one image, tagged
// tag, made of layers (bottom first). edit, if not nil, may change the
// config before it is written.
func writeTestLayout(t testing.TB, dir, tag string, layers []testLayer, edit func(*ocispec.Image)) {
	t.Helper()
	blobs := filepath.Join(dir, "blobs", "sha256")
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		t.Fatal(err)
	}
	put := func(data []byte) digest.Digest {
		d := digest.FromBytes(data)
		if err := os.WriteFile(filepath.Join(blobs, d.Encoded()), data, 0o644); err != nil {
			t.Fatal(err)
		}
		return d
	}
	var descs []ocispec.Descriptor
	var diffIDs []digest.Digest
	for _, l := range layers {
		desc, diffID := compressLayer(t, blobs, l)
		descs = append(descs, desc)
		diffIDs = append(diffIDs, diffID)
	}
	created := time.Date(2026, 11, 22, 0, 0, 0, 0, time.UTC)
	img := ocispec.Image{
		Created:  &created,
		Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		Config:   ocispec.ImageConfig{Cmd: []string{"/bin/sh"}},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: diffIDs},
	}
	if edit != nil {
		edit(&img)
	}
	cfg, _ := json.Marshal(img)
	m, _ := json.Marshal(ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: put(cfg), Size: int64(len(cfg))},
		Layers:    descs,
	})
	md := put(m)
	index, _ := json.Marshal(ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{{MediaType: ocispec.MediaTypeImageManifest, Digest: md, Size: int64(len(m)),
			Annotations: map[string]string{ocispec.AnnotationRefName: tag}}},
	})
	if err := os.WriteFile(filepath.Join(dir, "index.json"), index, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "oci-layout"), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644); err != nil {
		t.Fatal(err)
	}
}

// compressLayer writes a layer blob into blobs and returns its descriptor
// and diff_id.
func compressLayer(t testing.TB, blobs string, l testLayer) (ocispec.Descriptor, digest.Digest) {
	t.Helper()
	in, err := os.Open(l.tarPath)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	tmp, err := os.CreateTemp(blobs, ".layer-*")
	if err != nil {
		t.Fatal(err)
	}
	diffV := digest.SHA256.Digester()
	blobV := digest.SHA256.Digester()
	bw := bufio.NewWriterSize(io.MultiWriter(tmp, blobV.Hash()), 1<<20)
	var w io.WriteCloser
	mediaType := ocispec.MediaTypeImageLayer
	switch l.compression {
	case gzipped:
		w, mediaType = gzip.NewWriter(bw), ocispec.MediaTypeImageLayerGzip
	case zstdCompressed:
		zw, err := zstd.NewWriter(bw)
		if err != nil {
			t.Fatal(err)
		}
		w, mediaType = zw, ocispec.MediaTypeImageLayerZstd
	default:
		w = nopWriteCloser{bw}
	}
	if _, err := io.Copy(io.MultiWriter(w, diffV.Hash()), in); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := bw.Flush(); err != nil {
		t.Fatal(err)
	}
	st, _ := tmp.Stat()
	tmp.Close()
	d := blobV.Digest()
	if err := os.Rename(tmp.Name(), filepath.Join(blobs, d.Encoded())); err != nil {
		t.Fatal(err)
	}
	return ocispec.Descriptor{MediaType: mediaType, Digest: d, Size: st.Size()}, diffV.Digest()
}

type nopWriteCloser struct{ io.Writer }

func (nopWriteCloser) Close() error { return nil }

// tarEntry is one entry of a layer tar built by a test.
type tarEntry struct {
	hdr  tar.Header
	data []byte
}

// writeTar writes entries as a layer tar at path.
func writeTar(t testing.TB, path string, entries []tarEntry) {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.data))
		}
		if h.ModTime.IsZero() {
			h.ModTime = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
		}
		h.Format = tar.FormatPAX
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("tar header %s: %v", h.Name, err)
		}
		if _, err := tw.Write(e.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// debianRootfsTar returns a tar of a minimal Debian bookworm rootfs made
// by debootstrap from this machine's apt mirror, cached under
// /var/cache/obdtrace so later runs skip the download.
func debianRootfsTar(t testing.TB) string {
	t.Helper()
	cacheDir := os.Getenv("OBDTRACE_TEST_CACHE")
	if cacheDir == "" {
		cacheDir = "/var/cache/obdtrace/testdata"
	}
	path := filepath.Join(cacheDir, "debian-bookworm-minbase.tar")
	if _, err := os.Stat(path); err == nil {
		return path
	}
	for _, tool := range []string{"debootstrap", "tar"} {
		testutil.RequireTool(t, tool)
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(t.TempDir(), "rootfs")
	mirror, suite := aptMirror()
	cmd := exec.Command("debootstrap", "--variant=minbase", suite, root, mirror)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("debootstrap %s %s: %v\n%s", suite, mirror, err, tail(out, 2000))
	}
	tmp := path + ".tmp"
	cmd = exec.Command("tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sort=name", "-C", root, "-cf", tmp, ".")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("tar: %v\n%s", err, out)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	return path
}

// aptMirror returns the Debian mirror and suite apt is configured with
// here, defaulting to deb.debian.org and bookworm.
func aptMirror() (mirror, suite string) {
	mirror, suite = "http://deb.debian.org/debian", "bookworm"
	files, _ := filepath.Glob("/etc/apt/sources.list.d/*.sources")
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, stanza := range strings.Split(string(data), "\n\n") {
			var uri, suites string
			for _, line := range strings.Split(stanza, "\n") {
				if v, ok := strings.CutPrefix(line, "URIs:"); ok {
					uri = strings.Fields(v + " x")[0]
				}
				if v, ok := strings.CutPrefix(line, "Suites:"); ok {
					suites = strings.Fields(v + " x")[0]
				}
			}
			if uri != "x" && uri != "" && suites != "" && !strings.Contains(suites, "-") && !strings.Contains(uri, "security") {
				return uri, suites
			}
		}
	}
	return mirror, suite
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
