package main

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/obdtrace/obdtrace/snapshotter"
)

// TestLoadConfig checks the precedence the docs promise: defaults, then the
// file, then OBD_* variables, then flags given on the command line.
func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "snapshotter.yaml")
	if err := os.WriteFile(file, []byte(`
root: /file/root
address: /file/sock
cache:
  max_bytes: 1000000000
device:
  readahead_kb: 1024
registry:
  insecure: [a.example:5000]
  credentials:
    b.example:
      username: u
      password: p
  mirrors:
    docker.io: [mirror.example:5000, "http://m2.example"]
replay:
  workers: 3
  startup_hold: -1s
server:
  ready_timeout: 30s
`), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("OBD_ADDRESS", "/env/sock")
	t.Setenv("OBD_CACHE_MAX_BYTES", "2000000000")
	t.Setenv("OBD_REGISTRY_INSECURE", "c.example,d.example:80")
	cmd := newRootCommand()
	if err := cmd.ParseFlags([]string{"--root", "/flag/root"}); err != nil {
		t.Fatal(err)
	}
	cfg, err := loadConfig(file, cmd.Flags())
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][2]any{
		"root (flag)":          {cfg.Root, "/flag/root"},
		"address (env)":        {cfg.Address, "/env/sock"},
		"cache (env)":          {cfg.Cache.MaxBytes, int64(2000000000)},
		"workers (file)":       {cfg.Replay.Workers, 3},
		"hold (file)":          {cfg.Replay.StartupHold, -time.Second},
		"ready (file)":         {cfg.Server.ReadyTimeout, 30 * time.Second},
		"replay (default)":     {cfg.Replay.Enabled, true},
		"stop grace (default)": {cfg.Server.StopGrace, snapshotter.DefaultStopGrace},
		"state root (derived)": {cfg.StateRoot, "/flag/root/mounts"},
		"credentials (file)":   {cfg.Registry.Credentials["b.example"].Password, "p"},
		"readahead (file)":     {cfg.Device.ReadAheadKB, 1024},
	}
	for name, v := range want {
		if v[0] != v[1] {
			t.Errorf("%s: %v, want %v", name, v[0], v[1])
		}
	}
	if m := cfg.Registry.Mirrors["docker.io"]; !slices.Equal(m, []string{"mirror.example:5000", "http://m2.example"}) {
		t.Errorf("mirrors (file): %q", cfg.Registry.Mirrors)
	}
	if !slices.Equal(cfg.Registry.Insecure, []string{"c.example", "d.example:80"}) {
		t.Errorf("insecure (env): %q", cfg.Registry.Insecure)
	}
}

func TestLoadConfigErrors(t *testing.T) {
	cmd := newRootCommand()
	if _, err := loadConfig(filepath.Join(t.TempDir(), "missing.yaml"), cmd.Flags()); err == nil {
		t.Error("a missing --config file was accepted")
	}
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	os.WriteFile(bad, []byte("cache:\n  max_bytes: -5\n"), 0o600)
	if _, err := loadConfig(bad, cmd.Flags()); !errors.Is(err, snapshotter.ErrConfig) {
		t.Errorf("negative cache size: %v, want ErrConfig", err)
	}
	os.WriteFile(bad, []byte("device:\n  readahead_kb: 6\n"), 0o600)
	if _, err := loadConfig(bad, cmd.Flags()); !errors.Is(err, snapshotter.ErrConfig) {
		t.Errorf("readahead of 6 KiB: %v, want ErrConfig", err)
	}
	os.WriteFile(bad, []byte("server:\n  ready_timeout: soon\n"), 0o600)
	if _, err := loadConfig(bad, cmd.Flags()); err == nil {
		t.Error("a malformed duration was accepted")
	}
}
