package testutil

import (
	"bytes"
	"strings"
	"sync"
	"time"
)

// Buffer collects output written from other goroutines (a server's log,
// containerd's IO, a command's pipes) and lets a test read it or wait for
// a line in it.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// WaitFor waits until the output holds s, for at most timeout.
func (b *Buffer) WaitFor(s string, timeout time.Duration) bool {
	return WaitFor(timeout, func() bool { return strings.Contains(b.String(), s) })
}

// Closed returns a channel closed once the output holds s (never, if it
// does not within timeout).
func (b *Buffer) Closed(s string, timeout time.Duration) <-chan struct{} {
	ch := make(chan struct{})
	go func() {
		if b.WaitFor(s, timeout) {
			close(ch)
		}
	}()
	return ch
}

// WaitFor polls cond until it holds or timeout passes.
func WaitFor(timeout time.Duration, cond func() bool) bool {
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
