package registry

import (
	"os"
	"testing"

	"github.com/containerd/log"
)

func TestMain(m *testing.M) {
	// containerd's resolver logs every failed attempt at info level; the
	// negative tests make many on purpose.
	_ = log.SetLevel("warn")
	os.Exit(m.Run())
}
