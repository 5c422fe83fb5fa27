package wanproxy

import (
	"context"
	"sync"
	"time"
)

// lateSlack bounds the credit a stream gets for the proxy's own lateness.
// On a loaded machine a goroutine that should send its next chunk now may
// run tens of milliseconds later; a real sender would have had those bytes
// queued in its socket buffer, and the link would not have idled.
const lateSlack = 50 * time.Millisecond

// link is one direction of the emulated bottleneck, shared by every
// connection. It keeps a virtual clock instead of a token bucket: next is
// when the link finishes sending every chunk scheduled so far, so chunks
// are served in the order they arrive (parallel streams interleave chunk by
// chunk) and the link never sends faster than its rate, except to catch up
// on lateness the streams report (see pacer.send).
type link struct {
	bytesPerSecond int64

	mu   sync.Mutex
	next time.Time
}

// newLink returns a link of the given rate, or nil (unlimited) for 0.
func newLink(bytesPerSecond int64) *link {
	if bytesPerSecond <= 0 {
		return nil
	}
	return &link{bytesPerSecond: bytesPerSecond}
}

// schedule queues n bytes that became ready to send at arrival and returns
// when their last byte has left.
func (l *link) schedule(arrival time.Time, n int) time.Time {
	// n is at most a chunk (<= MaxChunkSize), so n*1e9 cannot overflow.
	d := time.Duration((int64(n)*int64(time.Second) + l.bytesPerSecond - 1) / l.bytesPerSecond)
	l.mu.Lock()
	defer l.mu.Unlock()
	start := l.next
	if arrival.After(start) {
		start = arrival // the link was idle
	}
	l.next = start.Add(d)
	return l.next
}

// pacer sends one stream's chunks over a link.
type pacer struct {
	link *link
	prev time.Time // when the stream's previous chunk left; zero before the first
}

// send waits until n bytes have crossed the link. readySince, when not
// zero, is when the stream's congestion window last opened: the stream
// could not send before it. A stream in mid-body had its next bytes ready
// as soon as its previous chunk left, so time it lost to scheduling is
// credited back, up to lateSlack.
func (s *pacer) send(ctx context.Context, n int, readySince time.Time) error {
	if s.link == nil || n == 0 {
		return nil
	}
	now := time.Now()
	arrival := now
	if !s.prev.IsZero() {
		arrival = latest(now.Add(-lateSlack), s.prev, readySince)
	}
	s.prev = s.link.schedule(arrival, n)
	return sleep(ctx, s.prev.Sub(now))
}

func latest(a time.Time, more ...time.Time) time.Time {
	for _, t := range more {
		if t.After(a) {
			a = t
		}
	}
	return a
}

// sleep waits for d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
