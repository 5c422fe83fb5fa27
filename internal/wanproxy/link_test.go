package wanproxy

import (
	"context"
	"testing"
	"time"
)

// TestSlowStartWindow steps the congestion-window model on a synthetic
// clock: it starts at 10 segments, grows by what each round acknowledged,
// stops limiting at the bandwidth-delay product, and restarts after idling
// longer than the RTO.
func TestSlowStartWindow(t *testing.T) {
	const rtt = 100 * time.Millisecond
	ss := &slowStart{enabled: true, rtt: rtt, rto: rtt + minRTO, bdp: 100_000}
	c := &tcpConn{}
	t0 := time.Unix(1000, 0)
	step := func(at time.Time, n, wantGrant int, wantWait time.Duration) {
		t.Helper()
		g, wait := c.grant(ss, at, n)
		if g != wantGrant || wait != wantWait {
			t.Fatalf("grant(%d) at +%v = %d, wait %v; want %d, wait %v (cwnd %d, in round %d)",
				n, at.Sub(t0), g, wait, wantGrant, wantWait, c.cwnd, c.inRound)
		}
	}
	step(t0, 16384, initialWindow, 0) // round 1: the initial window
	step(t0.Add(time.Millisecond), 16384, 0, rtt-time.Millisecond)
	step(t0.Add(rtt), 16384, 16384, 0) // round 2: cwnd 2 x 14600
	step(t0.Add(rtt), 16384, 2*initialWindow-16384, 0)
	step(t0.Add(rtt+time.Millisecond), 100, 0, rtt-time.Millisecond)
	c.giveBack(5000) // a short read: those bytes did not go
	step(t0.Add(rtt+2*time.Millisecond), 16384, 5000, 0)
	// Round 3: cwnd 58400; round 4: 116800 >= BDP, after which the window
	// no longer limits.
	step(t0.Add(2*rtt), 60000, 4*initialWindow, 0)
	step(t0.Add(3*rtt), 1<<20, 8*initialWindow, 0)
	step(t0.Add(3*rtt), 1<<20, 1<<20, 0)
	// Idle for less than the RTO keeps the window; longer restarts it.
	c.idle(t0.Add(4 * rtt))
	step(t0.Add(4*rtt+ss.rto), 1<<20, 1<<20, 0)
	c.idle(t0.Add(5 * rtt))
	step(t0.Add(5*rtt+ss.rto+time.Millisecond), 1<<20, initialWindow, 0)
}

func TestHandshakeOnce(t *testing.T) {
	var c tcpConn
	if !c.handshake() || c.handshake() || c.handshake() {
		t.Fatal("handshake must be paid on the first request only")
	}
}

// TestLinkSchedule checks the bottleneck's virtual clock: chunks queue
// behind each other at the link rate, and an idle link gives no burst.
func TestLinkSchedule(t *testing.T) {
	if newLink(0) != nil {
		t.Fatal("rate 0 must be an unlimited (nil) link")
	}
	l := newLink(1000) // 1000 B/s: 100 bytes take 100 ms
	t0 := time.Unix(1000, 0)
	for i, tc := range []struct {
		arrival time.Duration
		n       int
		done    time.Duration
	}{
		{0, 100, 100 * time.Millisecond},
		{0, 100, 200 * time.Millisecond},                   // queued behind the first
		{50 * time.Millisecond, 1, 201 * time.Millisecond}, // still busy
		{time.Second, 100, 1100 * time.Millisecond},        // idle: starts on arrival
		{time.Second, 3, 1103 * time.Millisecond},
	} {
		if got := l.schedule(t0.Add(tc.arrival), tc.n); !got.Equal(t0.Add(tc.done)) {
			t.Fatalf("chunk %d: done at +%v, want +%v", i, got.Sub(t0), tc.done)
		}
	}
}

// TestPacerCredit checks that a stream in mid-body is credited the time it
// lost to scheduling, up to lateSlack, but not time its window was shut.
func TestPacerCredit(t *testing.T) {
	ctx := context.Background()
	const chunk = 10_000 // 10 ms at 1 MB/s
	p := pacer{link: newLink(1_000_000)}
	start := time.Now()
	if err := p.send(ctx, chunk, time.Time{}); err != nil {
		t.Fatal(err)
	}
	// The first chunk gets no credit: it starts when it is sent.
	if p.prev.Before(start.Add(10 * time.Millisecond)) {
		t.Fatalf("first chunk left at +%v, want >= +10ms", p.prev.Sub(start))
	}
	// 30 ms late: the next chunk is scheduled as if sent on time.
	prev := p.prev.Add(-30 * time.Millisecond)
	p.prev = prev
	p.link.next = prev
	if err := p.send(ctx, chunk, time.Time{}); err != nil {
		t.Fatal(err)
	}
	if want := prev.Add(10 * time.Millisecond); !p.prev.Equal(want) {
		t.Fatalf("late chunk done %v after the previous one, want 10ms", p.prev.Sub(prev))
	}
	// Far too late: credit is capped at lateSlack.
	p.prev = time.Now().Add(-time.Second)
	p.link.next = p.prev
	before := time.Now()
	if err := p.send(ctx, chunk, time.Time{}); err != nil {
		t.Fatal(err)
	}
	after := time.Now()
	// send's own clock read lies between before and after.
	earliest, latestDone := before.Add(-lateSlack+10*time.Millisecond), after.Add(-lateSlack+10*time.Millisecond)
	if p.prev.Before(earliest) || p.prev.After(latestDone) {
		t.Fatalf("very late chunk done %v before the send, want %v (credit capped at lateSlack)", before.Sub(p.prev), lateSlack-10*time.Millisecond)
	}
	// A window that opened after the previous chunk left limits the credit.
	opened := time.Now().Add(-5 * time.Millisecond)
	p.prev = opened.Add(-40 * time.Millisecond)
	p.link.next = p.prev
	if err := p.send(ctx, chunk, opened); err != nil {
		t.Fatal(err)
	}
	if want := opened.Add(10 * time.Millisecond); !p.prev.Equal(want) {
		t.Fatalf("chunk after the window opened done %v after it opened, want 10ms", p.prev.Sub(opened))
	}
}
