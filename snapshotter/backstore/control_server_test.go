package backstore

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// TestControlHandlersBounded fills every handler with a peer that sends
// nothing: the next request is refused as busy once controlBusyWait
// passes, not given a goroutine; when one peer goes, requests are answered
// again.
func TestControlHandlersBounded(t *testing.T) {
	log := zerolog.New(zerolog.NewTestWriter(t))
	c := newController(context.Background(), Config{Logger: log}, nil, nil, nil, nil, log)
	sock := filepath.Join(t.TempDir(), controlSocketName)
	if err := c.listen(sock); err != nil {
		t.Fatal(err)
	}
	defer c.close()
	idle := make([]net.Conn, maxControlHandlers)
	for i := range idle {
		conn, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		idle[i] = conn
	}
	st := State{Control: sock}
	req := ControlRequest{Op: OpStopRecord, Path: "/nothing"}
	begin := time.Now()
	err := SendControl(context.Background(), st, req)
	if !errors.Is(err, ErrControlRefused) || !strings.Contains(err.Error(), "control requests are being handled") {
		t.Fatalf("request over %d idle peers: %v, want a busy refusal", maxControlHandlers, err)
	}
	if waited := time.Since(begin); waited < controlBusyWait {
		t.Errorf("refused after %v, before controlBusyWait %v", waited, controlBusyWait)
	}
	if got := len(c.slots); got != maxControlHandlers {
		t.Errorf("%d handlers hold a slot, want %d", got, maxControlHandlers)
	}

	// A peer that goes frees its handler: the next request gets a real
	// answer.
	idle[0].Close()
	if err := SendControl(context.Background(), st, req); !errors.Is(err, ErrNotRecording) {
		t.Errorf("request after a handler ended: %v, want ErrNotRecording", err)
	}
}

// TestControlReplayRunning asks a controller for a replay while one runs:
// the client sees ErrControlRefused saying a replay is running.
func TestControlReplayRunning(t *testing.T) {
	dir := t.TempDir()
	list := filepath.Join(dir, "list")
	if err := os.WriteFile(list, []byte("/hello\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	log := zerolog.New(zerolog.NewTestWriter(t))
	img := &Image{}
	cfg := Config{Mountpoint: dir, mounted: make(chan struct{}), Logger: log}
	rp := newReplays(context.Background())
	defer rp.stop()
	mon := newMonitor("ref", dir, img, nil)
	c := newController(context.Background(), cfg, img, nil, rp, mon, log)
	sock := filepath.Join(dir, controlSocketName)
	if err := c.listen(sock); err != nil {
		t.Fatal(err)
	}
	defer c.close()
	st := State{Control: sock}
	// The first waits for a mount that never comes.
	if err := SendControl(context.Background(), st, ControlRequest{Op: OpReplay, Path: list}); err != nil {
		t.Fatal(err)
	}
	err := SendControl(context.Background(), st, ControlRequest{Op: OpReplay, Path: list})
	if !errors.Is(err, ErrControlRefused) || !errors.Is(err, ErrReplayRunning) || !strings.Contains(err.Error(), "a replay is running") {
		t.Errorf("replay while one runs: %v, want ErrControlRefused saying a replay is running", err)
	}
}
