package testdata

import (
	"os"
	"testing"

	"github.com/obdtrace/obdtrace/lsmt"
)

// OpenBlob opens the overlaybd layer blob at path (a file of the shared
// test data, or one a test wrote) as lsmt.OpenBlob does, failing the test
// on any error; the blob and its file are closed when the test ends.
func OpenBlob(t testing.TB, path string) *lsmt.Blob {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	b, err := lsmt.OpenBlob(f, st.Size())
	if err != nil {
		t.Fatalf("OpenBlob(%s): %v", path, err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}
