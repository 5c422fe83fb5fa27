package backstore

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/internal/atomicfile"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/device"
)

// DefaultStateRoot holds one directory per mount: its state record, stats
// file, log and the frontend's private mounts.
const DefaultStateRoot = "/run/obdtrace/mounts"

// ErrNotMounted is returned when a directory has no mount of ours.
var ErrNotMounted = errors.New("backstore: not an obdtrace mount")

// State is what a mount leaves on disk so that it can be found and torn
// down by another process, also after its serving process died.
type State struct {
	Ref        string `json:"ref"`
	Mountpoint string `json:"mountpoint"`
	PID        int    `json:"pid"`
	PIDStart   uint64 `json:"pid_start"` // start time of PID, to tell a reused PID apart
	Device     string `json:"device"`
	FUSEDir    string `json:"fuse_dir"`
	StatsFile  string `json:"stats_file"`
	Metrics    string `json:"metrics,omitempty"` // address of /metrics
	// Control is the server's control socket (see SendControl); empty for
	// a server without one.
	Control string    `json:"control,omitempty"`
	Started time.Time `json:"started"`
}

// StateDir is the state directory of the mount at mountpoint.
func StateDir(root, mountpoint string) (string, error) {
	abs, err := filepath.Abs(mountpoint)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256([]byte(filepath.Clean(abs)))
	return filepath.Join(root, hex.EncodeToString(sum[:8])), nil
}

func writeState(dir string, s State) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(dir, "state.json"), b, 0o644)
}

// ReadState reads the state of the mount at mountpoint.
func ReadState(root, mountpoint string) (State, string, error) {
	dir, err := StateDir(root, mountpoint)
	if err != nil {
		return State{}, "", err
	}
	b, err := os.ReadFile(filepath.Join(dir, "state.json"))
	if errors.Is(err, os.ErrNotExist) {
		return State{}, dir, fmt.Errorf("%w: %s (no state in %s)", ErrNotMounted, mountpoint, dir)
	}
	if err != nil {
		return State{}, dir, err
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return State{}, dir, fmt.Errorf("backstore: state of %s: %w", mountpoint, err)
	}
	return s, dir, nil
}

// Teardown unmounts the mount at mountpoint and stops everything behind it:
// it unmounts the filesystem, stops the serving process (SIGTERM, then
// SIGKILL after grace), and, when that process is gone without cleaning up,
// detaches the loop device and unmounts the frontend's FUSE mount itself.
func Teardown(ctx context.Context, root, mountpoint string, grace time.Duration) error {
	s, dir, err := ReadState(root, mountpoint)
	if err != nil {
		return err
	}
	var errs []error
	if err := unmountIfMounted(s.Mountpoint); err != nil {
		errs = append(errs, err)
	}
	if processAlive(s.PID, s.PIDStart) {
		syscall.Kill(s.PID, syscall.SIGTERM)
		deadline := time.Now().Add(grace)
		for processAlive(s.PID, s.PIDStart) && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if processAlive(s.PID, s.PIDStart) {
			syscall.Kill(s.PID, syscall.SIGKILL)
			for i := 0; i < 100 && processAlive(s.PID, s.PIDStart); i++ {
				time.Sleep(20 * time.Millisecond)
			}
		}
	}
	// Whatever the process left: after a clean exit these find nothing.
	if err := device.Cleanup(ctx, s.FUSEDir); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("backstore: unmount %s: %w", mountpoint, err)
	}
	return os.RemoveAll(dir)
}

// unmountIfMounted unmounts dir when something is mounted there; a busy
// filesystem is detached lazily so that it goes once its last user does.
func unmountIfMounted(dir string) error {
	err := unix.Unmount(dir, 0)
	switch {
	case err == nil, errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOENT):
		return nil // unmounted, or nothing mounted there
	case errors.Is(err, unix.EBUSY):
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount %s: %w", dir, err)
		}
		return nil
	default:
		return fmt.Errorf("unmount %s: %w", dir, err)
	}
}

// processStart returns a process's start time in clock ticks since boot
// (field 22 of /proc/PID/stat), or 0 when it does not exist.
func processStart(pid int) uint64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// The command name (field 2) may hold spaces; fields resume after ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return 0
	}
	v, _ := strconv.ParseUint(f[19], 10, 64)
	return v
}

func processAlive(pid int, start uint64) bool {
	if pid <= 0 {
		return false
	}
	st := processStart(pid)
	if st == 0 || st != start {
		return false
	}
	// A zombie has exited: only its parent's wait is missing.
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if i := strings.LastIndexByte(string(b), ')'); i >= 0 && i+2 < len(b) && b[i+2] == 'Z' {
		return false
	}
	return true
}
