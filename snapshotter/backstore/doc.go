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
// metrics and a stats file.
package backstore
