package convert

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// The kernel work on a layer's filesystem (mount, apply, unmount) runs in a
// child process, never in the process that serves the layer's block device
// over FUSE. A process that waits in the kernel on its own FUSE server
// cannot be killed cleanly: SIGKILL stops the server's threads, but the
// FUSE connection is aborted only when the last thread has closed the
// device file, and the waiting thread never returns, so the process stays a
// zombie holding the mount. With the two apart, killing the converter ends
// the server, which aborts the connection and frees the child (which gets
// SIGKILL as its parent dies), and what is left is reclaimed by the next
// conversion (reclaimStale).
//
// The child is this same executable, started with childEnvVar naming its
// job; the package's init runs it before main.

// childEnvVar selects the child's job: childApply or childUnmount.
const childEnvVar = "OBDTRACE_CONVERT_CHILD"

const (
	// childApply: mount the ext4 device args[0] at args[1], apply the tar
	// read from stdin, unmount.
	childApply = "apply"
	// childUnmount: unmount args[0].
	childUnmount = "unmount"
)

func init() {
	if job := os.Getenv(childEnvVar); job != "" {
		os.Exit(runChild(job, os.Args[1:]))
	}
}

// runChild does the child's job and returns its exit status; errors go to
// stderr for the parent to report.
func runChild(job string, args []string) int {
	var err error
	switch {
	case job == childApply && len(args) == 2:
		err = childApplyLayer(args[0], args[1])
	case job == childUnmount && len(args) == 1:
		err = unmount(args[0])
	default:
		err = fmt.Errorf("convert child: bad job %q with %d arguments", job, len(args))
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func childApplyLayer(dev, mnt string) (err error) {
	if err := mountExt4(dev, mnt); err != nil {
		return err
	}
	defer func() {
		if uerr := unmount(mnt); err == nil {
			err = uerr
		}
	}()
	in := bufio.NewReaderSize(os.Stdin, 1<<20)
	if err := applyLayer(context.Background(), mnt, in); err != nil {
		return err
	}
	// What follows the tar's end-of-archive blocks still counts towards the
	// parent's digest checks.
	_, err = io.Copy(io.Discard, in)
	return err
}

// runInChild runs a child job, feeding it stdin (may be nil), and waits for
// it. Cancelling ctx kills the child.
func runInChild(ctx context.Context, job string, stdin io.Reader, args ...string) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("convert: find this executable: %w", err)
	}
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, exe, args...)
	cmd.Env = append(os.Environ(), childEnvVar+"="+job)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, io.Discard, &stderr
	// The parent-death signal is tied to the thread that forks the child:
	// keep that thread for as long as the child runs.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			done <- err
			return
		}
		done <- cmd.Wait()
	}()
	if err := <-done; err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = err.Error()
		}
		return fmt.Errorf("convert: %s: %s", job, msg)
	}
	return nil
}

// isMounted says whether something is mounted at dir.
func isMounted(dir string) bool {
	var st, parent unix.Stat_t
	if unix.Stat(dir, &st) != nil || unix.Stat(dir+"/..", &parent) != nil {
		return false
	}
	return st.Dev != parent.Dev
}

// errChildStdin is how the parent closes a child's stdin early.
var errChildStdin = errors.New("layer applied")
