// Package ctrenv runs the world the containerd integration tests run in: a
// throwaway containerd (built from Go modules by scripts/install-containerd.sh)
// with the project's snapshotter as its proxy plugin, started and stopped by
// scripts/containerd-env.sh under a test's temporary directory. It is test
// support: every helper takes a testing.TB and fails or skips the test.
//
// Missing prerequisites (root, containerd, runc) fail the test under
// CI=true and skip it otherwise (see package testutil).
package ctrenv

import (
	"bufio"
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

	"github.com/obdtrace/obdtrace/internal/testutil"
)

// RequireRoot is the environment's gate (testutil.RequireRoot): call it
// first in a test that starts one.
func RequireRoot(t testing.TB) {
	t.Helper()
	testutil.RequireRoot(t, "containerd, mounts, loop devices, FUSE")
}

// RepoRoot is the module root: the nearest directory above the working
// directory (the test's package) holding go.mod.
func RepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
		if filepath.Dir(d) == d {
			t.Fatalf("no go.mod above %s", dir)
		}
	}
}

// ContainerdBinDir installs containerd, ctr and the runc shim when missing
// (the script is idempotent and quick when they are there).
func ContainerdBinDir(t testing.TB) string {
	t.Helper()
	cmd := exec.Command(filepath.Join(RepoRoot(t), "scripts", "install-containerd.sh"))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		testutil.Missing(t, "scripts/install-containerd.sh: %v\n%s", err, stderr.String())
	}
	dir := strings.TrimSpace(string(out))
	for _, c := range []string{"containerd", "ctr", "containerd-shim-runc-v2"} {
		if _, err := os.Stat(filepath.Join(dir, c)); err != nil {
			t.Fatalf("install-containerd.sh printed %s, which lacks %s: %v", dir, c, err)
		}
	}
	return dir
}

// GoBuild builds pkg (a path relative to the module root, such as
// "./cmd/obd-recorder") into dir/name and returns the binary.
func GoBuild(t testing.TB, dir, name, pkg string, static bool) string {
	t.Helper()
	bin := filepath.Join(dir, name)
	cmd := exec.Command("go", "build", "-o", bin, pkg)
	cmd.Dir = RepoRoot(t)
	if static {
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, out)
	}
	return bin
}

// Options configure Start.
type Options struct {
	// InsecureHost is a registry host the snapshotter speaks plain HTTP to.
	InsecureHost string
	// Baselayer is upstream's ext4 baselayer blob, for images built on it.
	Baselayer string
	// Snapshotter is a prebuilt obd-snapshotter ("" = build it).
	Snapshotter string
	// Env adds NAME=value settings (OBD_* for the snapshotter).
	Env []string
}

// Env is a running containerd-env.sh environment.
type Env struct {
	// Dir holds everything: sockets, logs, containerd's and the
	// snapshotter's roots.
	Dir string
	// Sock is containerd's socket; Metrics the snapshotter's metrics
	// address (host:port).
	Sock, Metrics string

	t      testing.TB
	script string
	vars   []string
	ctrBin string
}

// Start starts containerd and the snapshotter with containerd-env.sh and
// stops them when the test ends (dumping their logs when it failed).
func Start(t testing.TB, opts Options) *Env {
	t.Helper()
	cbin := ContainerdBinDir(t)
	testutil.RequireTool(t, "runc")
	sbin := opts.Snapshotter
	if sbin == "" {
		sbin = GoBuild(t, t.TempDir(), "obd-snapshotter", "./cmd/obd-snapshotter", false)
	}
	e := &Env{
		t: t, Dir: t.TempDir(), script: filepath.Join(RepoRoot(t), "scripts", "containerd-env.sh"),
		ctrBin: filepath.Join(cbin, "ctr"), Metrics: FreeAddr(t),
	}
	e.vars = append(os.Environ(),
		"OBD_SNAPSHOTTER_BIN="+sbin, "CONTAINERD_BIN_DIR="+cbin, "OBD_KEEP=1",
		"OBD_REGISTRY_INSECURE="+opts.InsecureHost, "OBD_BASELAYER="+opts.Baselayer,
		"OBD_METRICS_ADDRESS="+e.Metrics, "OBD_SERVER_STATS_INTERVAL=200ms")
	e.vars = append(e.vars, opts.Env...)
	e.Sock = strings.TrimSpace(e.Script(t, "start", e.Dir))
	t.Cleanup(func() {
		if t.Failed() {
			e.DumpLogs()
		}
		e.Script(t, "stop", e.Dir)
	})
	return e
}

// Script runs containerd-env.sh with args in the environment's settings.
func (e *Env) Script(t testing.TB, args ...string) string {
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

// Ctr runs ctr against the environment's containerd in namespace ns.
func (e *Env) Ctr(ns string, args ...string) (string, error) {
	cmd := exec.Command(e.ctrBin, append([]string{"--address", e.Sock, "--namespace", ns}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// MustCtr is Ctr failing the test on error.
func (e *Env) MustCtr(t testing.TB, ns string, args ...string) string {
	t.Helper()
	out, err := e.Ctr(ns, args...)
	if err != nil {
		t.Fatalf("ctr %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// SnapshotterPID is the running snapshotter's process ID.
func (e *Env) SnapshotterPID(t testing.TB) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(e.Dir, "snapshotter.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// SnapshotterLog is the snapshotter's log so far.
func (e *Env) SnapshotterLog() string {
	b, _ := os.ReadFile(filepath.Join(e.Dir, "snapshotter.log"))
	return string(b)
}

// DumpLogs logs the tails of containerd's, the snapshotter's and the image
// servers' logs.
func (e *Env) DumpLogs() {
	for _, name := range []string{"snapshotter.log", "containerd.log"} {
		b, _ := os.ReadFile(filepath.Join(e.Dir, name))
		e.t.Logf("--- %s (tail)\n%s", name, TailLines(string(b), 40))
	}
	logs, _ := filepath.Glob(filepath.Join(e.Dir, "snapshotter", "snapshots", "*", "block", "server.log"))
	for _, l := range logs {
		b, _ := os.ReadFile(l)
		e.t.Logf("--- %s (tail)\n%s", l, TailLines(string(b), 20))
	}
}

// TailLines returns the last n lines of s.
func TailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// Metric returns the sum of a metric's samples on the snapshotter's
// /metrics (0 when absent).
func (e *Env) Metric(t testing.TB, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + e.Metrics + "/metrics")
	if err != nil {
		t.Fatalf("scrape metrics: %v", err)
	}
	defer resp.Body.Close()
	return SumMetric(resp.Body, name)
}

// SumMetric sums the samples of metric name in a Prometheus text exposition.
func SumMetric(r io.Reader, name string) float64 {
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

// WaitNoDevice waits until no mount or loop device is left below the
// environment: containerd removes a container's snapshot in the background.
//
// Its garbage collector (v2.4) can drop a deletion that lands while a pass
// is calling the snapshotter, and then collects only on the next activity,
// so a snapshot may outlive its container indefinitely on an idle daemon.
// Deleting a throwaway lease with --sync forces a synchronous pass, which
// is what a busy node's next pull or container would do anyway.
func (e *Env) WaitNoDevice(t testing.TB) {
	t.Helper()
	lease := "ctrenv-gc-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	if _, err := e.Ctr("default", "leases", "create", "--id", lease); err == nil {
		if out, err := e.Ctr("default", "leases", "delete", "--sync", lease); err != nil {
			t.Logf("forcing a garbage collection: %v: %s", err, out)
		}
	}
	if !WaitFor(15*time.Second, func() bool { return len(testutil.Leftovers(e.Dir)) == 0 }) {
		t.Fatalf("devices left after the last container went:\n%s", strings.Join(testutil.Leftovers(e.Dir), "\n"))
	}
}

// FreeAddr returns a free 127.0.0.1 TCP address.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// sleeperSource is a static program for containers of the hello-world
// image, which holds nothing that keeps running: it reads /hello, prints
// "ready", and exits on SIGTERM, or, given the argument "ignore-term",
// ignores SIGTERM (as PID 1 it would ignore it anyway without a handler).
const sleeperSource = `package main

import (
	"crypto/sha256"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	term := make(chan os.Signal, 1)
	ignore := len(os.Args) > 1 && os.Args[1] == "ignore-term"
	if ignore {
		signal.Ignore(syscall.SIGTERM)
	} else {
		signal.Notify(term, syscall.SIGTERM)
	}
	b, err := os.ReadFile("/hello")
	fmt.Printf("ready %x %v\n", sha256.Sum256(b), err)
	for ignore {
		time.Sleep(time.Hour)
	}
	<-term
}
`

// BuildSleeper builds the sleeper program (see sleeperSource) and returns
// the binary, to be bind-mounted into a container.
func BuildSleeper(t testing.TB) string {
	t.Helper()
	return BuildProgram(t, "sleeper", sleeperSource)
}

// BuildProgram builds a one-file Go program from source into a static
// binary called name (static, so it runs inside any image it is
// bind-mounted into) and returns its path. It lives in t's temporary
// directory, so a binary shared by subtests is built with the parent's t.
func BuildProgram(t testing.TB, name, source string) string {
	t.Helper()
	dir := t.TempDir()
	src := filepath.Join(dir, name+".go")
	if err := os.WriteFile(src, []byte(source), 0o644); err != nil {
		t.Fatal(err)
	}
	return GoBuild(t, dir, name, src, true)
}
