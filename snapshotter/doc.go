// Package snapshotter is the containerd snapshotter of this project, run as
// a proxy plugin (gRPC on a unix socket). It owns the snapshot metadata
// (containerd's storage.MetaStore, one transaction per change), the
// directories of ordinary overlay snapshots, containerd's remote-snapshot
// protocol for overlaybd layers, and the life cycle of the per-image block
// backstore servers (package backstore) that their containers read through.
//
// Ordinary OCI layers behave as in containerd's overlay snapshotter. An
// overlaybd layer, recognised by the blob-digest label the pull passes, is
// committed at once under its target name without being downloaded. When a
// container's snapshot is prepared on top of an overlaybd chain, one backstore
// server for that chain is spawned as a separate process (so it outlives a
// restart or crash of the snapshotter), its ext4 is mounted read-only inside
// the top layer's snapshot directory, and the container's writable layer is an
// overlay above it. The server is torn down when the last snapshot using it is
// removed; at start-up the snapshotter re-adopts live servers and tears down
// orphans, guided by the state records the servers leave on disk.
//
// Upstream's record/replay labels on a container's snapshot are handed to
// the image's server: in its spec when the container brings the device up,
// over the server's control channel when the device is already attached.
// Bad trace labels are logged and counted, never fatal to a container.
// Registry mirrors are a transport in front of the backstore's registry
// client.
package snapshotter
