package crc32c

import (
	"hash/crc32"
	"testing"
)

func TestUpdateIsRawRegister(t *testing.T) {
	// A raw CRC of nothing is its seed.
	if got := Update(0, nil); got != 0 {
		t.Fatalf("Update(0, nil) = %#x, want 0", got)
	}
	if got := Update(BlockSeed, nil); got != BlockSeed {
		t.Fatalf("Update(seed, nil) = %#x, want seed", got)
	}
	// With seed 0xFFFFFFFF and a final inversion, the raw form is the standard CRC32C.
	p := []byte("123456789")
	if got, want := ^Update(0xFFFFFFFF, p), crc32.Checksum(p, table); got != want {
		t.Fatalf("inverted raw = %#x, want %#x", got, want)
	}
	// Splitting the input must not change the result.
	if a, b := Update(7, p), Update(Update(7, p[:4]), p[4:]); a != b {
		t.Fatalf("split update %#x != whole %#x", b, a)
	}
}
