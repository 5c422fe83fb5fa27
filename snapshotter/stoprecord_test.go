package snapshotter

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/moby/locker"
	"github.com/rs/zerolog"

	"github.com/obdtrace/obdtrace/snapshotter/backstore"
)

// selfStart is this process's start time in clock ticks, as serverAlive
// reads it from /proc.
func selfStart(t *testing.T) uint64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	start, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return start
}

// TestStopRecordingBounded gives a removal an image server whose control
// channel takes the stop-record request and never answers: the removal
// must give up after its own short wait, not the control channel's
// minute, and say so.
func TestStopRecordingBounded(t *testing.T) {
	root := t.TempDir()
	var logs bytes.Buffer
	s := &Snapshotter{cfg: Config{StateRoot: filepath.Join(root, "mounts")}, root: root,
		log: zerolog.New(&logs), imageLocks: locker.New(), stopWait: 200 * time.Millisecond}
	sock := filepath.Join(root, "ctl.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close() // read, never answered
		}
	}()
	dir, err := backstore.StateDir(s.cfg.StateRoot, s.imageMountpoint("7"))
	if err != nil {
		t.Fatal(err)
	}
	st := backstore.State{PID: os.Getpid(), PIDStart: selfStart(t), Control: sock}
	b, _ := json.Marshal(st)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "state.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	if !serverAlive(st) {
		t.Fatal("the fake server's state does not name a live process")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	done := make(chan struct{})
	go func() {
		s.stopRecording(ctx, "7", filepath.Join(root, "trace"))
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		t.Fatal("stopRecording waited past its own bound")
	}
	if !strings.Contains(logs.String(), "stop-record not answered in time") {
		t.Errorf("no warning that the stop went unanswered; logs:\n%s", logs.String())
	}
}
