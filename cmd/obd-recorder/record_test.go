package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"

	"github.com/obdtrace/obdtrace/internal/testutil/ctrenv"
	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/recorder/record"
)

func TestRecordUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"record", "--duration", "1s", "only-one"}, "want IMAGE NEW_IMAGE"},
		{[]string{"record", "--duration", "1s", "a", "b", "c"}, "put a command after --"},
		{[]string{"record", "--duration", "1s", "a", "--", "b"}, "want IMAGE NEW_IMAGE"},
		{[]string{"record", "a", "b"}, `"duration" not set`},
		{[]string{"record", "--duration", "1s", "--mount", "src=/x", "a", "b"}, "absolute destination"},
		{[]string{"record", "--duration", "0s", "-a", "/nonexistent/containerd.sock", "a", "b"}, "duration 0s"},
	} {
		cmd := newRootCmd()
		cmd.SetArgs(tc.args)
		cmd.SetOut(&bytes.Buffer{})
		cmd.SetErr(&bytes.Buffer{})
		if err := cmd.Execute(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: err %v, want one saying %q", tc.args, err, tc.want)
		}
	}
}

// TestRecordSignals runs the built binary against a real containerd and
// interrupts it as a user would with Ctrl-C: once, which ends the recording
// and still makes the image; twice, which aborts. Either way nothing of the
// run is left in containerd.
func TestRecordSignals(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test (containerd, registry): not with -short")
	}
	ctrenv.RequireRoot(t)
	reg := registry.Start(t, registry.Options{})
	ref := reg.PushHelloWorld(t)
	e := ctrenv.Start(t, ctrenv.Options{InsecureHost: reg.Host, Baselayer: testdata.Baselayer(t)})
	bin := buildRecorder(t)
	sleeper := ctrenv.BuildSleeper(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const ns = "obdcli"
	client, err := containerd.New(e.Sock, containerd.WithDefaultNamespace(ns))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()

	run := func(t *testing.T, newImage string, signals int, sleeperArgs ...string) (stdout, stderr string, err error) {
		traceDir := t.TempDir()
		var out, errOut ctrenv.Buffer
		cmd := exec.Command(bin, append([]string{"record", "--duration", "60s", "--stop-grace", "30s", "--insecure",
			"-a", e.Sock, "-n", ns, "--trace-dir", traceDir,
			"--mount", "type=bind,src=" + sleeper + ",dst=/sleeper", ref, newImage, "--", "/sleeper"}, sleeperArgs...)...)
		cmd.Stdout, cmd.Stderr = &out, &errOut
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if !errOut.WaitFor("ready", time.Minute) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("the container never got ready; stderr:\n%s", errOut.String())
		}
		cmd.Process.Signal(syscall.SIGINT)
		if signals > 1 {
			errOut.WaitFor("ending the recording", 10*time.Second)
			cmd.Process.Signal(syscall.SIGINT)
		}
		err = cmd.Wait()
		left, lerr := ctrenv.Objects(ctx, client, record.DefaultSnapshotter, func(id string, labels map[string]string) bool {
			_, labelled := labels[record.LabelRecord]
			return labelled || strings.HasPrefix(id, "obd-record-")
		})
		if lerr != nil || len(left) > 0 {
			t.Errorf("left behind: %v %v", left, lerr)
		}
		if entries, _ := os.ReadDir(traceDir); len(entries) > 0 {
			t.Errorf("trace directory left: %s", entries[0].Name())
		}
		return out.String(), errOut.String(), err
	}

	t.Run("Ctrl-C ends the recording", func(t *testing.T) {
		newImage := reg.Host + "/hello-traced:cli"
		stdout, stderr, err := run(t, newImage, 1)
		if err != nil {
			t.Fatalf("record: %v\n%s", err, stderr)
		}
		if !strings.Contains(stdout, "(requested, exit code 0)") || !strings.Contains(stdout, "new image:        "+newImage) {
			t.Errorf("summary:\n%s", stdout)
		}
		if _, err := client.GetImage(ctx, newImage); err != nil {
			t.Errorf("image %s: %v", newImage, err)
		}
	})
	t.Run("Ctrl-C twice aborts", func(t *testing.T) {
		newImage := reg.Host + "/hello-traced:cli-aborted"
		// Ignoring SIGTERM, the container outlasts the first Ctrl-C.
		stdout, stderr, err := run(t, newImage, 2, "ignore-term")
		var exit *exec.ExitError
		if !errors.As(err, &exit) || !strings.Contains(stderr, "aborting") || stdout != "" {
			t.Fatalf("aborted record: %v\nstdout:\n%s\nstderr:\n%s", err, stdout, stderr)
		}
		if _, err := client.GetImage(ctx, newImage); err == nil {
			t.Errorf("an aborted record created %s", newImage)
		}
	})
}
