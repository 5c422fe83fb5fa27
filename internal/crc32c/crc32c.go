// Package crc32c computes CRC32C (Castagnoli) the way overlaybd does: a raw
// register update with no pre- or post-inversion. Upstream's ZFile digests,
// jump-table and block checksums and its binary trace checksum all use this
// form, so the standard library's crc32.Checksum (which inverts) gives
// different numbers for the same bytes.
package crc32c

import "hash/crc32"

var table = crc32.MakeTable(crc32.Castagnoli)

// BlockSeed is the seed upstream uses for the CRC stored after each ZFile block.
const BlockSeed = 100007

// Update continues a raw CRC32C over p, starting from crc (0 for a fresh sum).
func Update(crc uint32, p []byte) uint32 {
	// crc32.Update inverts on entry and on exit; undo both to get the raw register.
	return ^crc32.Update(^crc, table, p)
}
