package backstore

import (
	"crypto/sha256"
	"fmt"
	"io"
	"os"

	"github.com/opencontainers/go-digest"
)

func fileDigest(f *os.File) (digest.Digest, error) {
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, 0, 1<<62)); err != nil {
		return "", fmt.Errorf("backstore: hash %s: %w", f.Name(), err)
	}
	return digest.NewDigest(digest.SHA256, h), nil
}
