package ctrenv

import (
	"time"

	"github.com/obdtrace/obdtrace/internal/testutil"
)

// Buffer collects output written from other goroutines; see testutil.Buffer.
type Buffer = testutil.Buffer

// WaitFor polls cond until it holds or timeout passes.
func WaitFor(timeout time.Duration, cond func() bool) bool { return testutil.WaitFor(timeout, cond) }
