package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/obdtrace/obdtrace/bpf/bpftest"
	"github.com/obdtrace/obdtrace/internal/testutil"
)

// buildRecorder builds the real binary, so the tests exercise flags, signals
// and exit codes exactly as a user would.
func buildRecorder(t *testing.T) string {
	t.Helper()
	goBin := testutil.RequireTool(t, "go")
	dir := t.TempDir()
	bin := filepath.Join(dir, "obd-recorder")
	out, err := exec.Command(goBin, "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// startCapture starts `obd-recorder capture` and waits until its programs are
// attached, returning their IDs for the leak checks.
// startCapture starts the capture command and waits until wantLinks of its
// BPF links are attached (they attach one after the other).
func startCapture(t *testing.T, bin string, wantLinks int, stdout, stderr *bytes.Buffer, args ...string) (cmd *exec.Cmd, progs, links []uint32) {
	t.Helper()
	cmd = exec.Command(bin, append([]string{"capture"}, args...)...)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		progs, links = bpftest.BPFObjects(t, cmd.Process.Pid, "obd_")
		if len(links) >= wantLinks {
			return cmd, progs, links
		}
	}
	t.Fatalf("capture never attached; stderr: %s", stderr)
	return nil, nil, nil
}

type jsonLine struct {
	TsNs    uint64 `json:"ts_ns"`
	Dev     string `json:"dev"`
	Sector  uint64 `json:"sector"`
	Sectors uint32 `json:"sectors"`
	Op      string `json:"op"`
	PID     int    `json:"pid"`
	Comm    string `json:"comm"`
}

func parseLines(t *testing.T, b []byte) []jsonLine {
	t.Helper()
	var out []jsonLine
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		var l jsonLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Fatalf("line %d is not JSON: %q: %v", len(out)+1, sc.Text(), err)
		}
		out = append(out, l)
	}
	return out
}

type summary struct {
	Events    int64   `json:"events"`
	Lost      uint64  `json:"lost"`
	DurationS float64 `json:"duration_s"`
	Mode      string  `json:"mode"`
}

func parseSummary(t *testing.T, stderr []byte) summary {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(string(stderr)), "\n")
	var s summary
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &s); err != nil {
		t.Fatalf("last stderr line is not the JSON summary: %q: %v", stderr, err)
	}
	return s
}

// Two devices named both ways, a third not captured; SIGINT stops it and the
// output file holds exactly the reads, in order.
func TestCaptureSignalToFile(t *testing.T) {
	bpftest.Require(t)
	bin := buildRecorder(t)
	dir := bpftest.Tmpfs(t, 64<<20)
	a, b, other := bpftest.NewLoop(t, dir, 8<<20), bpftest.NewLoop(t, dir, 8<<20), bpftest.NewLoop(t, dir, 8<<20)
	outDir := t.TempDir()
	out := filepath.Join(outDir, "events.jsonl")
	var stdout, stderr bytes.Buffer
	cmd, progs, links := startCapture(t, bin, 1, &stdout, &stderr,
		"--device", a.Path, "--device", fmt.Sprintf("%d:%d", b.Major, b.Minor), "--output", out)

	type read struct {
		dev      string
		off, len int64
	}
	var want []read
	for i := int64(0); i < 5; i++ {
		a.ReadDirect(t, i<<20, 4096)
		b.ReadDirect(t, i<<20+8192, 16384)
		other.ReadDirect(t, i<<20, 4096)
		want = append(want, read{fmt.Sprintf("%d:%d", a.Major, a.Minor), i << 20, 4096},
			read{fmt.Sprintf("%d:%d", b.Major, b.Minor), i<<20 + 8192, 16384})
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("output exists before the capture ended: %v", err)
	}
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("capture exited with %v; stderr: %s", err, stderr.String())
	}
	bpftest.AssertGone(t, progs, links)

	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	got := parseLines(t, data)
	if len(got) != len(want) {
		t.Fatalf("%d lines, want %d:\n%s", len(got), len(want), data)
	}
	var prev uint64
	for i, l := range got {
		w := want[i]
		if l.Dev != w.dev || l.Sector != uint64(w.off/512) || l.Sectors != uint32(w.len/512) ||
			!strings.HasPrefix(l.Op, "read") || l.PID != os.Getpid() || l.TsNs < prev {
			t.Errorf("line %d: %+v, want read of %s sector %d+%d by pid %d after ts %d",
				i, l, w.dev, w.off/512, w.len/512, os.Getpid(), prev)
		}
		prev = l.TsNs
	}
	s := parseSummary(t, stderr.Bytes())
	if s.Events != int64(len(want)) || s.Lost != 0 || s.DurationS <= 0 || s.Mode == "" {
		t.Errorf("summary %+v, want %d events, 0 lost, a duration and a mode", s, len(want))
	}
	if stdout.Len() != 0 {
		t.Errorf("stdout not empty with --output: %q", stdout.String())
	}
	if ents, _ := os.ReadDir(outDir); len(ents) != 1 {
		t.Errorf("output directory holds %d entries, want only the output", len(ents))
	}
}

// --duration ends the capture by itself, streaming to stdout.
func TestCaptureDurationToStdout(t *testing.T) {
	bpftest.Require(t)
	bin := buildRecorder(t)
	dir := bpftest.Tmpfs(t, 32<<20)
	a := bpftest.NewLoop(t, dir, 8<<20)
	var stdout, stderr bytes.Buffer
	start := time.Now()
	cmd, _, _ := startCapture(t, bin, 1, &stdout, &stderr, "--device", a.Path, "--duration", "1s")
	a.ReadDirect(t, 4096, 4096)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("capture: %v; stderr: %s", err, stderr.String())
	}
	if el := time.Since(start); el > 15*time.Second {
		t.Errorf("--duration 1s ran %v", el)
	}
	got := parseLines(t, stdout.Bytes())
	if len(got) != 1 || got[0].Sector != 8 || got[0].Sectors != 8 {
		t.Fatalf("stdout %q, want one read of sector 8+8", stdout.String())
	}
	if s := parseSummary(t, stderr.Bytes()); s.Events != 1 {
		t.Errorf("summary %+v, want 1 event", s)
	}
}

// kill -9 leaves no program or link attached (they are FD-based) and no
// output debris.
func TestCaptureKill9LeavesNothing(t *testing.T) {
	bpftest.Require(t)
	bin := buildRecorder(t)
	dir := bpftest.Tmpfs(t, 32<<20)
	a := bpftest.NewLoop(t, dir, 8<<20)
	outDir := t.TempDir()
	var stdout, stderr bytes.Buffer
	cmd, progs, links := startCapture(t, bin, 2, &stdout, &stderr,
		"--device", a.Path, "--latency", "--output", filepath.Join(outDir, "x.jsonl"))
	// Issue and completion are attached; the flush program is loaded but
	// never attached (the reader runs it on a CPU).
	if len(progs) != 3 || len(links) != 2 {
		t.Errorf("with --latency: programs %v links %v, want three programs and two links", progs, links)
	}
	a.ReadDirect(t, 0, 4096)
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	bpftest.AssertGone(t, progs, links)
	if ents, _ := os.ReadDir(outDir); len(ents) != 0 {
		t.Errorf("kill -9 left %d entries in the output directory", len(ents))
	}
}

func TestCaptureErrors(t *testing.T) {
	bpftest.Require(t)
	bin := buildRecorder(t)
	run := func(t *testing.T, cred *syscall.Credential, args ...string) string {
		t.Helper()
		cmd := exec.Command(bin, append([]string{"capture"}, args...)...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		out, err := cmd.CombinedOutput()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
			t.Fatalf("capture %v: %v, want exit status 1; output %s", args, err, out)
		}
		return string(out)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{nil, `required flag(s) "device" not set`},
		{[]string{"--device", "/dev/null"}, "not a block device"},
		{[]string{"--device", "99999:1"}, "out of range"},
		{[]string{"--device", "7:0", "--ring-size", "1000"}, "bad ring buffer size"},
	} {
		if out := run(t, nil, c.args...); !strings.Contains(out, c.want) {
			t.Errorf("capture %v: output %q, want it to say %q", c.args, out, c.want)
		}
	}
	// Unprivileged: the binary must be reachable by nobody.
	for d := filepath.Dir(bin); d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	out := run(t, &syscall.Credential{Uid: 65534, Gid: 65534}, "--device", "7:0", "--duration", "1s")
	if !strings.Contains(out, "insufficient privileges") || !strings.Contains(out, "CAP_BPF") {
		t.Errorf("as nobody: %q, want an error naming the missing capabilities", out)
	}
}
