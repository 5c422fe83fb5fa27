package backstore

import (
	"context"
	"encoding/binary"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// FIEMAP, from linux/fiemap.h (x/sys/unix does not carry it).
const (
	fsIocFiemap       = 0xC020660B // _IOWR('f', 11, struct fiemap)
	fiemapHeaderSize  = 32
	fiemapExtentSize  = 56
	fiemapBatch       = 128 // extents asked for per ioctl
	fiemapExtentLast  = 0x1
	fiemapSkipFlags   = 0x2 | 0x4 | 0x8 | 0x800 // unknown, delalloc, encoded, unwritten: no data to fetch
	fiemapMaxRequests = 1 << 16                 // bounds the ioctls per file
	ext4BlockAlign    = 4096
)

// fileExtents calls fn with the device byte range of each extent holding
// the data of the open file fd of size bytes, in file order, up to its
// size rounded up to a block (as upstream clips them). It stops, with
// ctx's error, between ioctls once ctx ends: a fragmented file takes many.
func fileExtents(ctx context.Context, fd int, size int64, fn func(phys, n int64)) error {
	if size <= 0 {
		return nil
	}
	limit := (size + ext4BlockAlign - 1) / ext4BlockAlign * ext4BlockAlign
	// uint64 words keep the kernel's struct 8-byte aligned.
	buf := make([]uint64, (fiemapHeaderSize+fiemapBatch*fiemapExtentSize)/8)
	b := unsafe.Slice((*byte)(unsafe.Pointer(&buf[0])), len(buf)*8)
	le := binary.NativeEndian
	for start, i := int64(0), 0; start < limit; i++ {
		if i >= fiemapMaxRequests {
			return fmt.Errorf("backstore: fiemap: over %d requests", fiemapMaxRequests)
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		clear(b[:fiemapHeaderSize])
		le.PutUint64(b[0:], uint64(start))
		le.PutUint64(b[8:], uint64(limit-start))
		le.PutUint32(b[24:], fiemapBatch)
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), fsIocFiemap, uintptr(unsafe.Pointer(&buf[0]))); errno != 0 {
			return fmt.Errorf("backstore: fiemap: %w", errno)
		}
		mapped := int(le.Uint32(b[20:]))
		if mapped == 0 {
			return nil
		}
		if mapped > fiemapBatch {
			return fmt.Errorf("backstore: fiemap: kernel reports %d extents, asked for %d", mapped, fiemapBatch)
		}
		next := start
		for j := range mapped {
			e := b[fiemapHeaderSize+j*fiemapExtentSize:]
			logical, phys, n := int64(le.Uint64(e[0:])), int64(le.Uint64(e[8:])), int64(le.Uint64(e[16:]))
			flags := le.Uint32(e[40:])
			if logical < 0 || phys < 0 || n <= 0 || logical >= limit {
				return nil
			}
			n = min(n, limit-logical)
			if flags&fiemapSkipFlags == 0 {
				fn(phys, n)
			}
			next = logical + n
			if flags&fiemapExtentLast != 0 {
				return nil
			}
		}
		if next <= start {
			return fmt.Errorf("backstore: fiemap: no progress at byte %d", start)
		}
		start = next
	}
	return nil
}
