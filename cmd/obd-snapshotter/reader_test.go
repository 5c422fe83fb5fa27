package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/obdtrace/obdtrace/internal/testutil/ctrenv"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
)

// readerSource is a static program run inside the container: each time
// /ctl/go-N appears it reads /hello and writes its sha256 to /ctl/out-N,
// until /ctl/stop appears.
const readerSource = `package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"time"
)

func main() {
	for i := 1; ; {
		if _, err := os.Stat("/ctl/stop"); err == nil {
			return
		}
		if _, err := os.Stat(fmt.Sprintf("/ctl/go-%d", i)); err == nil {
			out := ""
			if b, err := os.ReadFile("/hello"); err != nil {
				out = "error: " + err.Error()
			} else {
				sum := sha256.Sum256(b)
				out = hex.EncodeToString(sum[:])
			}
			os.WriteFile(fmt.Sprintf("/ctl/out-%d", i), []byte(out), 0o644)
			i++
		}
		time.Sleep(20 * time.Millisecond)
	}
}
`

// readerContainer is a running container of the hello-world image that
// reads /hello on request, through a control directory bind-mounted in.
type readerContainer struct {
	t         *testing.T
	ctl       string
	container containerd.Container
	task      containerd.Task
	exited    <-chan containerd.ExitStatus
}

// startReader starts a reader container called name, running the reader
// program bin, whose snapshot carries labels.
func startReader(ctx context.Context, t *testing.T, bin string, client *containerd.Client, img containerd.Image, name string, labels map[string]string) *readerContainer {
	t.Helper()
	work := t.TempDir()
	r := &readerContainer{t: t, ctl: filepath.Join(work, "ctl")}
	if err := os.Mkdir(r.ctl, 0o755); err != nil {
		t.Fatal(err)
	}
	var err error
	r.container, err = client.NewContainer(ctx, name,
		containerd.WithImage(img), containerd.WithSnapshotter("overlaybd"),
		containerd.WithNewSnapshot(name+"-rootfs", img, snapshots.WithLabels(labels)),
		containerd.WithNewSpec(oci.WithImageConfig(img), oci.WithProcessArgs("/reader"), oci.WithMounts([]specs.Mount{
			{Destination: "/reader", Type: "bind", Source: bin, Options: []string{"rbind", "ro"}},
			{Destination: "/ctl", Type: "bind", Source: r.ctl, Options: []string{"rbind", "rw"}},
		})))
	if err != nil {
		t.Fatal(err)
	}
	if r.task, err = r.container.NewTask(ctx, cio.NullIO); err != nil {
		t.Fatal(err)
	}
	if r.exited, err = r.task.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if err := r.task.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return r
}

// dropCache evicts the container's /hello from the page cache (of the
// overlay and the ext4 file beneath), so the next read goes to the device.
// It is targeted rather than a global drop_caches, which would disturb the
// page-cache assertions of tests running in parallel.
func (r *readerContainer) dropCache() {
	r.t.Helper()
	syscall.Sync()
	f, err := os.Open(fmt.Sprintf("/proc/%d/root/hello", r.task.Pid()))
	if err != nil {
		r.t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		r.t.Fatalf("fadvise: %v", err)
	}
}

// read asks the container to read /hello (request i) and checks the bytes.
func (r *readerContainer) read(i int) {
	r.t.Helper()
	if err := os.WriteFile(filepath.Join(r.ctl, fmt.Sprintf("go-%d", i)), nil, 0o644); err != nil {
		r.t.Fatal(err)
	}
	var got []byte
	if !ctrenv.WaitFor(20*time.Second, func() bool {
		var err error
		got, err = os.ReadFile(filepath.Join(r.ctl, fmt.Sprintf("out-%d", i)))
		return err == nil
	}) {
		r.t.Fatalf("read %d: the container did not answer", i)
	}
	if string(got) != testdata.HelloSHA256 {
		r.t.Fatalf("read %d: /hello sha256 %q, want %s", i, got, testdata.HelloSHA256)
	}
}

// stop makes the program exit, checks its status and deletes the task and
// the container with its snapshot.
func (r *readerContainer) stop(ctx context.Context) {
	r.t.Helper()
	if err := os.WriteFile(filepath.Join(r.ctl, "stop"), nil, 0o644); err != nil {
		r.t.Fatal(err)
	}
	select {
	case st := <-r.exited:
		if st.ExitCode() != 0 {
			r.t.Fatalf("reader exited with %d", st.ExitCode())
		}
	case <-time.After(20 * time.Second):
		r.t.Fatal("reader did not exit")
	}
	if _, err := r.task.Delete(ctx); err != nil {
		r.t.Fatal(err)
	}
	if err := r.container.Delete(ctx, containerd.WithSnapshotCleanup); err != nil {
		r.t.Fatal(err)
	}
}
