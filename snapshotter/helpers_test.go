package snapshotter

import (
	"context"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/opencontainers/go-digest"
)

func storageGetInfo(ctx context.Context, key string) (string, snapshots.Info, snapshots.Usage, error) {
	return storage.GetInfo(ctx, key)
}

func storageSnapshot(kind snapshots.Kind, id string, parents ...string) storage.Snapshot {
	return storage.Snapshot{Kind: kind, ID: id, ParentIDs: parents}
}

func digestOf(s string) digest.Digest { return digest.Digest(s) }
