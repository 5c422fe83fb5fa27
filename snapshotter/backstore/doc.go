// Package backstore serves an overlaybd image from a registry as a block
// device: it resolves the image, opens each layer blob through the on-disk
// blob cache (fetching only the blocks that are read), stacks the layers
// (with the ext4 baselayer beneath when the image needs it), attaches the
// merged disk through a device frontend and mounts its filesystem read-only.
//
// Subpackages own the parts: registry (resolution and ranged reads),
// blobcache (the cache), device (the FUSE + loop frontend). This package
// assembles them, runs replay at mount, keeps per-mount state on disk so a
// mount can be torn down after its serving process died, and exports
// metrics and a stats file. A running server takes record, stop-record and
// replay requests on a unix socket in its state directory (the control
// channel), so label triggers also work on a device already attached for
// another container; a replay may name a trace or upstream's path list,
// whose files' extents (FIEMAP on the mounted ext4) become frames.
package backstore
