package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/internal/testutil"
	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/snapshotter/backstore"
)

// buildObdctl builds the command into a temporary directory: the mount
// command re-executes itself as its background server.
func buildObdctl(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "obdctl")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func hashFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func leftovers(work string) string {
	var found []string
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(mounts), "\n") {
		if strings.Contains(l, work) {
			found = append(found, "mount: "+l)
		}
	}
	loops, _ := exec.Command("losetup", "-a").Output()
	for _, l := range strings.Split(string(loops), "\n") {
		if strings.Contains(l, work) {
			found = append(found, "loop: "+l)
		}
	}
	return strings.Join(found, "\n")
}

// TestMountUmountAndRecovery runs obdctl as a user would: mount in the
// background, read /hello, unmount; then mount again with the cache warm,
// kill -9 the server, and check that umount still cleans everything up.
func TestMountUmountAndRecovery(t *testing.T) {
	testutil.RequireRoot(t, "loop devices, FUSE, mount")
	bin := buildObdctl(t)
	reg := registry.Start(t, registry.Options{})
	ref := reg.PushHelloWorld(t)
	work := t.TempDir()
	mnt := filepath.Join(work, "mnt")
	os.Mkdir(mnt, 0o755)
	stats := filepath.Join(work, "stats.json")
	common := []string{"--state-root", filepath.Join(work, "state"), "--cache-dir", filepath.Join(work, "cache"),
		"--baselayer", testdata.Baselayer(t), "--stats-file", stats}
	obdctl := func(args ...string) (string, error) {
		out, err := exec.Command(bin, args...).CombinedOutput()
		return string(out), err
	}
	t.Cleanup(func() { exec.Command(bin, "umount", "--state-root", filepath.Join(work, "state"), mnt).Run() })

	out, err := obdctl(append([]string{"mount", "--insecure", ref, mnt}, common...)...)
	if err != nil {
		t.Fatalf("mount: %v\n%s", err, out)
	}
	if got := hashFile(t, filepath.Join(mnt, "hello")); got != testdata.HelloSHA256 {
		t.Fatalf("/hello sha256 %s", got)
	}
	if out, err := obdctl("umount", "--state-root", filepath.Join(work, "state"), mnt); err != nil {
		t.Fatalf("umount: %v\n%s", err, out)
	}
	if l := leftovers(work); l != "" {
		t.Fatalf("after umount:\n%s", l)
	}
	var st backstore.Stats
	b, _ := os.ReadFile(stats)
	if err := json.Unmarshal(b, &st); err != nil || st.Cache.BytesFetched == 0 {
		t.Fatalf("stats after the first mount: %+v, %v", st.Cache, err)
	}

	// Mount again (warm cache), kill the server hard, and recover.
	// The warm mount with a readahead of its own: the flag reaches the
	// background server.
	if out, err := obdctl(append([]string{"mount", "--insecure", "--readahead-kb", "1024", ref, mnt}, common...)...); err != nil {
		t.Fatalf("second mount: %v\n%s", err, out)
	}
	state, _, err := backstore.ReadState(filepath.Join(work, "state"), mnt)
	if err != nil {
		t.Fatal(err)
	}
	if got := hashFile(t, filepath.Join(mnt, "hello")); got != testdata.HelloSHA256 {
		t.Fatalf("warm /hello sha256 %s", got)
	}
	var fst syscall.Stat_t
	if err := syscall.Stat(state.FUSEDir, &fst); err != nil {
		t.Fatal(err)
	}
	ra, err := os.ReadFile(fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(fst.Dev), unix.Minor(fst.Dev)))
	if err != nil || strings.TrimSpace(string(ra)) != "1024" {
		t.Errorf("the FUSE mount's readahead is %q (%v), want the 1024 KiB asked for", ra, err)
	}
	b, _ = os.ReadFile(stats)
	if err := json.Unmarshal(b, &st); err != nil || st.Cache.BytesFetched != 0 {
		t.Fatalf("warm mount fetched %d bytes (%v)", st.Cache.BytesFetched, err)
	}
	if err := syscall.Kill(state.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100 && syscall.Kill(state.PID, 0) == nil; i++ {
		time.Sleep(20 * time.Millisecond)
	}
	if out, err := obdctl("umount", "--state-root", filepath.Join(work, "state"), mnt); err != nil {
		t.Fatalf("umount after kill -9: %v\n%s", err, out)
	}
	if l := leftovers(work); l != "" {
		t.Fatalf("after kill -9 and umount:\n%s", l)
	}
	if _, err := os.Stat(filepath.Join(mnt, "hello")); err == nil {
		t.Fatal("/hello still visible after umount")
	}
}

// TestMountRejectsBadReadAhead: a readahead that is no multiple of 4 KiB is
// refused before anything is mounted, naming the flag.
func TestMountRejectsBadReadAhead(t *testing.T) {
	cmd := newMountCommand()
	cmd.SetArgs([]string{"--readahead-kb", "6", "example.com/image:tag", t.TempDir()})
	cmd.SetOut(new(strings.Builder))
	cmd.SetErr(new(strings.Builder))
	err := cmd.Execute()
	if err == nil || !strings.Contains(err.Error(), "--readahead-kb") {
		t.Errorf("readahead of 6 KiB: %v, want an error naming --readahead-kb", err)
	}
}
