package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/obdtrace/obdtrace/internal/testutil/registry"
)

// This file starts the world the integration test runs in: containerd
// binaries, the snapshotter binary, and containerd-env.sh.

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("this test needs root (containerd, mounts, loop devices, FUSE)")
	}
	t.Skip("needs root (containerd, mounts, loop devices, FUSE)")
}

// repoRoot is the module root, two levels above this package.
func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "go.mod")); err != nil {
		t.Fatalf("module root not found at %s: %v", dir, err)
	}
	return dir
}

// containerdBinDir installs containerd, ctr and the runc shim when missing
// (the script is idempotent and quick when they are there).
func containerdBinDir(t *testing.T) string {
	t.Helper()
	cmd := exec.Command(filepath.Join(repoRoot(t), "scripts", "install-containerd.sh"))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := fmt.Sprintf("scripts/install-containerd.sh: %v\n%s", err, stderr.String())
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	dir := strings.TrimSpace(string(out))
	for _, c := range []string{"containerd", "ctr", "containerd-shim-runc-v2"} {
		if _, err := os.Stat(filepath.Join(dir, c)); err != nil {
			t.Fatalf("install-containerd.sh printed %s, which lacks %s: %v", dir, c, err)
		}
	}
	return dir
}

// goBuild builds a package (or a file) into dir and returns the binary.
func goBuild(t *testing.T, dir, name, pkg string, static bool) string {
	t.Helper()
	bin := filepath.Join(dir, name)
	cmd := exec.Command("go", "build", "-o", bin, pkg)
	if static {
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, out)
	}
	return bin
}

// env is a running containerd-env.sh environment.
type env struct {
	t       *testing.T
	dir     string
	script  string
	vars    []string
	ctrBin  string
	sock    string
	metrics string
	// readerBin is the reader containers' program, built on first use.
	readerBin string
}

// startEnv starts containerd and the snapshotter with containerd-env.sh,
// with insecureHost spoken to over plain HTTP, and stops them at the end
// of the test.
func startEnv(t *testing.T, insecureHost, baselayer string) *env {
	t.Helper()
	cbin := containerdBinDir(t)
	registry.RequireTool(t, "runc")
	dir := t.TempDir()
	sbin := goBuild(t, t.TempDir(), "obd-snapshotter", ".", false)
	e := &env{
		t: t, dir: dir, script: filepath.Join(repoRoot(t), "scripts", "containerd-env.sh"),
		ctrBin: filepath.Join(cbin, "ctr"), metrics: freeAddr(t),
	}
	e.vars = append(os.Environ(),
		"OBD_SNAPSHOTTER_BIN="+sbin, "CONTAINERD_BIN_DIR="+cbin, "OBD_KEEP=1",
		"OBD_REGISTRY_INSECURE="+insecureHost, "OBD_BASELAYER="+baselayer,
		"OBD_METRICS_ADDRESS="+e.metrics, "OBD_SERVER_STATS_INTERVAL=200ms",
		// 4 KiB cache blocks: replay fetches just a trace's ranges, so a
		// prefetch hit is not hidden by the mount's own reads of the
		// hello-world layer's few blocks.
		"OBD_CACHE_BLOCK_SIZE=4096", "OBD_CACHE_REFILL_SIZE=4096")
	out := e.script1(t, "start", dir)
	e.sock = strings.TrimSpace(out)
	t.Cleanup(func() {
		if t.Failed() {
			e.dumpLogs()
		}
		e.script1(t, "stop", dir)
	})
	return e
}

func (e *env) script1(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(e.script, args...)
	cmd.Env = e.vars
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("containerd-env.sh %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return string(out)
}

// ctr runs ctr against the environment's containerd.
func (e *env) ctr(ns string, args ...string) (string, error) {
	cmd := exec.Command(e.ctrBin, append([]string{"--address", e.sock, "--namespace", ns}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (e *env) mustCtr(t *testing.T, ns string, args ...string) string {
	t.Helper()
	out, err := e.ctr(ns, args...)
	if err != nil {
		t.Fatalf("ctr %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (e *env) snapshotterPID(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(e.dir, "snapshotter.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

func (e *env) snapshotterLog() string {
	b, _ := os.ReadFile(filepath.Join(e.dir, "snapshotter.log"))
	return string(b)
}

func (e *env) dumpLogs() {
	for _, name := range []string{"snapshotter.log", "containerd.log"} {
		b, _ := os.ReadFile(filepath.Join(e.dir, name))
		e.t.Logf("--- %s (tail)\n%s", name, tailLines(string(b), 40))
	}
	logs, _ := filepath.Glob(filepath.Join(e.dir, "snapshotter", "snapshots", "*", "block", "server.log"))
	for _, l := range logs {
		b, _ := os.ReadFile(l)
		e.t.Logf("--- %s (tail)\n%s", l, tailLines(string(b), 20))
	}
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// metric returns the sum of a metric's samples on the snapshotter's
// /metrics (0 when absent).
func (e *env) metric(t *testing.T, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + e.metrics + "/metrics")
	if err != nil {
		t.Fatalf("scrape metrics: %v", err)
	}
	defer resp.Body.Close()
	return sumMetric(resp.Body, name)
}

func sumMetric(r io.Reader, name string) float64 {
	var sum float64
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) || (len(line) > len(name) && line[len(name)] != '{' && line[len(name)] != ' ') {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			sum += v
		}
	}
	return sum
}

// leftovers lists mounts and loop devices below dir.
func leftovers(dir string) []string {
	var found []string
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(mounts), "\n") {
		if f := strings.Fields(l); len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			found = append(found, "mount "+f[4])
		}
	}
	loops, _ := exec.Command("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE").Output()
	for _, l := range strings.Split(string(loops), "\n") {
		if strings.Contains(l, dir+"/") {
			found = append(found, "loop "+l)
		}
	}
	return found
}

// waitNoDevice waits until no mount or loop device is left below the
// environment: containerd removes a container's snapshot in the background.
func (e *env) waitNoDevice(t *testing.T) {
	t.Helper()
	if !waitFor(15*time.Second, func() bool { return len(leftovers(e.dir)) == 0 }) {
		t.Fatalf("devices left after the last container went:\n%s", strings.Join(leftovers(e.dir), "\n"))
	}
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
