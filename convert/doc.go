// Package convert turns OCI images into overlaybd images, as upstream's
// converter (accelerated-container-image's convertor) does: each layer's
// tar is applied, in order, to an ext4 filesystem held in a writable LSMT
// layer over the layers below, and the changed blocks are committed as that
// layer's blob (ZFile, LZ4, 4 KiB blocks, CRC, over a committed LSMT, in a
// tar wrapper), with the layer's chain id as its UUID. Configs, diff_ids,
// manifests and indexes are written as upstream writes them.
//
// Converting is deterministic: the same input gives the same digests. The
// kernel's ext4 is made to place every block the same way (one CPU for the
// writes, no delayed allocation, no background work), the fields it fills
// from the clock or at random are normalised afterwards (package ext4), the
// journal is returned to its state before the mount, and a layer stores
// exactly the 4 KiB blocks whose content changed (lsmt.CommitChanges), so
// how the kernel wrote them does not matter. docs/convert.md has the
// measurements behind each choice.
//
// The kernel work on a layer (mount, apply, unmount) runs in a child
// process, this executable run again: the package's init does the child's
// job when the environment variable OBDTRACE_CONVERT_CHILD names one, so any
// program importing this package can convert. The parent serves the layer's
// block device over FUSE and must never wait on it itself, or a killed
// converter would hang on its own device.
//
// Converted layers are cached by chain id, so converting an image whose
// top layers changed reuses the lower layers' blobs, and the traces
// recorded against them stay valid.
package convert
