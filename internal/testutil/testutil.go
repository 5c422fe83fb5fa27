// Package testutil owns the gates tests share, and the check that a test
// left no mount or loop device behind.
//
// A gate decides what happens when a test's prerequisite (root, an
// executable, a device) is missing. Under CI=true a
// missing prerequisite fails the test, since the CI machine must have
// everything and a silent skip there would hide a gap; elsewhere the test is
// skipped with the reason, so a developer machine still runs the rest.
//
// The heavier fixtures live in its subpackages: testdata (the upstream
// blobs), registry (a real OCI registry) and ctrenv (containerd with the
// snapshotter).
package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// CI reports whether the tests run under CI (the environment variable CI
// is "true"), where nothing may be skipped for want of a prerequisite.
func CI() bool { return os.Getenv("CI") == "true" }

// Missing ends the test for want of a prerequisite the message names:
// it fails under CI and skips otherwise.
func Missing(tb testing.TB, format string, args ...any) {
	tb.Helper()
	msg := fmt.Sprintf(format, args...)
	if CI() {
		tb.Fatalf("%s (required under CI=true)", msg)
	} else {
		tb.Skip(msg)
	}
}

// RequireRoot returns when the test runs as root and otherwise ends it
// through Missing; why says what root is needed for ("loop devices, FUSE").
func RequireRoot(tb testing.TB, why string) {
	tb.Helper()
	if os.Geteuid() != 0 {
		Missing(tb, "needs root (%s)", why)
	}
}

// RequireTool returns the path of the named executable on PATH and
// otherwise ends the test through Missing.
func RequireTool(tb testing.TB, name string) string {
	tb.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Missing(tb, "%s not found on PATH (make deps installs it): %v", name, err)
	}
	return p
}

// Leftovers lists the mounts and loop devices below dir, as "mount PATH"
// and "loop DEVICE FILE" lines: what a test that mounted or attached
// something under dir must have undone.
func Leftovers(dir string) []string {
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
