package wanproxy

import (
	"context"
	"sync"
	"time"
)

// initialWindow is Linux's initial congestion window (RFC 6928: 10 segments
// of a 1460-byte MSS).
const initialWindow = 10 * 1460

// minRTO is Linux's floor on the retransmission timeout; a connection idle
// for longer than RTT+minRTO restarts slow start (tcp_slow_start_after_idle,
// on by default).
const minRTO = 200 * time.Millisecond

// slowStart holds the parameters of the congestion-window model. Once a
// connection's window reaches the bandwidth-delay product the shared
// bottleneck, not the window, limits it, so the model stops there.
type slowStart struct {
	enabled bool
	rtt     time.Duration
	rto     time.Duration // idle time after which the window restarts
	bdp     int64         // window size at which the model stops limiting
}

// tcpConn is what the emulated TCP connection behind one client connection
// remembers across its requests: whether the handshake was paid, and its
// congestion window.
type tcpConn struct {
	mu          sync.Mutex
	established bool
	cwnd        int64     // bytes that may be unacknowledged in one round
	inRound     int64     // bytes sent in the current round
	roundEnd    time.Time // when the current round's acknowledgements are back
	idleSince   time.Time // end of the last response; zero while sending
}

// handshake reports whether this is the connection's first request, which
// pays the TCP handshake, and marks it established.
func (c *tcpConn) handshake() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	first := !c.established
	c.established = true
	return first
}

// grant asks to send n bytes at now. It returns how many may go now (0 < g
// <= n), or 0 and how long to wait for the current round's acknowledgements.
// In slow start the window grows by the bytes acknowledged, so it doubles
// each round while the sender keeps it full.
func (c *tcpConn) grant(ss *slowStart, now time.Time, n int) (int, time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cwnd == 0 || (!c.idleSince.IsZero() && now.Sub(c.idleSince) > ss.rto) {
		c.cwnd, c.inRound, c.roundEnd = initialWindow, 0, time.Time{}
	}
	c.idleSince = time.Time{}
	if c.cwnd >= ss.bdp {
		return n, 0
	}
	if !now.Before(c.roundEnd) {
		c.cwnd += c.inRound
		c.inRound, c.roundEnd = 0, now.Add(ss.rtt)
	}
	room := c.cwnd - c.inRound
	if room <= 0 {
		return 0, c.roundEnd.Sub(now)
	}
	g := min(int64(n), room)
	c.inRound += g
	return int(g), 0
}

// giveBack returns granted bytes that were not sent (a short read).
func (c *tcpConn) giveBack(n int) {
	c.mu.Lock()
	c.inRound = max(0, c.inRound-int64(n))
	c.mu.Unlock()
}

// idle marks the end of a response: the window starts aging from now.
func (c *tcpConn) idle(now time.Time) {
	c.mu.Lock()
	c.idleSince = now
	c.mu.Unlock()
}

// acquire waits until the connection's window lets at least one of n bytes
// go and returns how many may, and when the window opened if it had to
// wait (zero otherwise).
func (c *tcpConn) acquire(ctx context.Context, ss *slowStart, n int) (int, time.Time, error) {
	if !ss.enabled {
		return n, time.Time{}, nil
	}
	var opened time.Time
	for {
		now := time.Now()
		g, wait := c.grant(ss, now, n)
		if g > 0 {
			return g, opened, nil
		}
		opened = now.Add(wait)
		if err := sleep(ctx, wait); err != nil {
			return 0, time.Time{}, err
		}
	}
}
