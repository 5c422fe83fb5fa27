package testutil

import (
	"fmt"
	"strings"
	"testing"
)

// recorder is a testing.TB that records how a gate ended the test instead
// of ending it.
type recorder struct {
	testing.TB
	failed, skipped string
}

func (r *recorder) Helper() {}

func (r *recorder) Fatalf(format string, args ...any) { r.failed = fmt.Sprintf(format, args...) }

func (r *recorder) Skip(args ...any) { r.skipped = fmt.Sprint(args...) }

func TestMissing(t *testing.T) {
	for _, ci := range []string{"true", "", "1"} {
		t.Run("CI="+ci, func(t *testing.T) {
			t.Setenv("CI", ci)
			r := &recorder{TB: t}
			Missing(r, "needs %s", "a thing")
			if ci == "true" {
				if r.skipped != "" || !strings.Contains(r.failed, "needs a thing") || !strings.Contains(r.failed, "CI=true") {
					t.Fatalf("under CI: failed %q, skipped %q; want a failure naming the thing and CI", r.failed, r.skipped)
				}
				return
			}
			if r.failed != "" || r.skipped != "needs a thing" {
				t.Fatalf("outside CI: failed %q, skipped %q; want a skip with the reason", r.failed, r.skipped)
			}
		})
	}
}

func TestRequireTool(t *testing.T) {
	t.Setenv("CI", "")
	r := &recorder{TB: t}
	if p := RequireTool(r, "sh"); p == "" || r.skipped != "" || r.failed != "" {
		t.Fatalf("sh: path %q, skipped %q, failed %q; want its path", p, r.skipped, r.failed)
	}
	t.Setenv("PATH", t.TempDir())
	if p := RequireTool(r, "sh"); p != "" || !strings.Contains(r.skipped, "sh not found on PATH") {
		t.Fatalf("sh off PATH: path %q, skipped %q; want a skip naming sh", p, r.skipped)
	}
}
