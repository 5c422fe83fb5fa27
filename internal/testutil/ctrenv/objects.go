package ctrenv

import (
	"context"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/snapshots"
)

// Objects lists the containers, tasks, snapshots (of snapshotter) and
// leases in client's namespace for which match(id, labels) holds, as
// "kind id" lines: what a test expects to have been cleaned up.
func Objects(ctx context.Context, client *containerd.Client, snapshotter string, match func(id string, labels map[string]string) bool) ([]string, error) {
	var found []string
	cs, err := client.Containers(ctx)
	if err != nil {
		return nil, err
	}
	for _, c := range cs {
		labels, err := c.Labels(ctx)
		if err != nil {
			return nil, err
		}
		if match(c.ID(), labels) {
			found = append(found, "container "+c.ID())
		}
	}
	tasks, err := client.TaskService().List(ctx, nil)
	if err != nil {
		return nil, err
	}
	for _, task := range tasks.Tasks {
		if match(task.ID, nil) {
			found = append(found, "task "+task.ID)
		}
	}
	err = client.SnapshotService(snapshotter).Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		if match(info.Name, info.Labels) {
			found = append(found, "snapshot "+info.Name)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	ls, err := client.LeasesService().List(ctx)
	if err != nil {
		return nil, err
	}
	for _, l := range ls {
		if match(l.ID, l.Labels) {
			found = append(found, "lease "+l.ID)
		}
	}
	return found, nil
}
