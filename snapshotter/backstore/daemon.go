package backstore

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// readyEnv names the environment variable through which a spawned server
// learns the descriptor to report readiness on.
const readyEnv = "OBD_READY_FD"

// Spawn starts argv as a detached server (its own session, stdout and
// stderr appended to logPath) and waits until it reports ready (see
// NotifyReady), fails, or timeout passes. The server outlives the caller.
func Spawn(ctx context.Context, argv []string, logPath string, timeout time.Duration) error {
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("backstore: server log: %w", err)
	}
	defer logFile.Close()
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.ExtraFiles = []*os.File{w} // fd 3
	cmd.Env = append(os.Environ(), readyEnv+"=3")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return fmt.Errorf("backstore: start server: %w", err)
	}
	w.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(r).ReadString('\n')
		line <- strings.TrimSpace(s)
	}()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case msg := <-line:
		if msg == "ready" {
			return nil
		}
		if msg == "" { // the pipe closed: the server exited
			err := <-exited
			return fmt.Errorf("backstore: server exited (%v); log: %s%s", err, logPath, tail(logPath))
		}
		return fmt.Errorf("backstore: server failed: %s", msg)
	case <-timer.C:
		cmd.Process.Signal(syscall.SIGTERM)
		return fmt.Errorf("backstore: server not ready after %v; log: %s%s", timeout, logPath, tail(logPath))
	case <-ctx.Done():
		cmd.Process.Signal(syscall.SIGTERM)
		return ctx.Err()
	}
}

// NotifyReady tells the process that spawned this one that it is ready, or
// why it failed (err non-nil). It does nothing when not spawned by Spawn.
func NotifyReady(err error) {
	if os.Getenv(readyEnv) != "3" {
		return
	}
	f := os.NewFile(3, "ready")
	if f == nil {
		return
	}
	defer f.Close()
	msg := "ready"
	if err != nil {
		msg = strings.ReplaceAll(err.Error(), "\n", " ")
	}
	fmt.Fprintln(f, msg)
	os.Unsetenv(readyEnv)
}

// tail returns the last lines of a log file, for error messages.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil || len(b) == 0 {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	lines = lines[max(0, len(lines)-5):]
	return "\n  " + strings.Join(lines, "\n  ")
}
