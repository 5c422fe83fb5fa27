// Package testdata locates the upstream-made overlaybd blobs that tests use
// to prove compatibility. They live in ../shared/testdata/overlaybd beside the
// checkout (CI has it there) and are never copied into the repository.
package testdata

import (
	"archive/tar"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"testing"
)

// Facts about the shared blobs.
const (
	// HelloLayerDigest is the upstream-converted hello-world layer.
	HelloLayerDigest = "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
	// HelloSHA256 is the sha256 of /hello in that image.
	HelloSHA256 = "d3f7d10e296e5c626ea78539cb38cd8dffd043bea3627da35ce3b20c0ac68014"
	// HelloSize is the size of /hello in bytes.
	HelloSize = 13256
)

// Dir returns the shared overlaybd test data directory, failing the test
// when it is missing: every test that calls this needs it.
func Dir(t testing.TB) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	// file is <repo>/internal/testutil/testdata/testdata.go
	repo := filepath.Join(filepath.Dir(file), "..", "..", "..")
	dir := filepath.Join(repo, "..", "shared", "testdata", "overlaybd")
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("shared test data missing (want ../shared beside the checkout): %v", err)
	}
	return dir
}

// OCILayout returns the path of the upstream hello-world OCI layout.
func OCILayout(t testing.TB) string {
	return filepath.Join(Dir(t), "aci-hello-world-oci")
}

// Blob returns the path of a blob of the hello-world OCI layout.
func Blob(t testing.TB, digest string) string {
	t.Helper()
	if len(digest) < 8 || digest[:7] != "sha256:" {
		t.Fatalf("bad digest %q", digest)
	}
	return filepath.Join(OCILayout(t), "blobs", "sha256", digest[7:])
}

// Baselayer extracts the ext4 baselayer (ext4_64 from ext4_64.tar.gz) into
// a temporary directory and returns its path.
func Baselayer(t testing.TB) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "ext4_64")
	if err := extract(filepath.Join(Dir(t), "ext4_64.tar.gz"), "ext4_64", out); err != nil {
		t.Fatalf("extract baselayer: %v", err)
	}
	return out
}

func extract(archive, name, out string) error {
	f, err := os.Open(archive)
	if err != nil {
		return err
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		return err
	}
	tr := tar.NewReader(gz)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("%s not found in %s", name, archive)
		}
		if err != nil {
			return err
		}
		if filepath.Base(h.Name) != name || h.Typeflag != tar.TypeReg {
			continue
		}
		w, err := os.Create(out)
		if err != nil {
			return err
		}
		if _, err := io.Copy(w, tr); err != nil {
			w.Close()
			return err
		}
		return w.Close()
	}
}
