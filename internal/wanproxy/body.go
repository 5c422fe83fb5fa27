package wanproxy

import (
	"context"
	"io"
	"time"
)

// downBody paces one response body over the emulated link: at most one chunk
// per Read, each waiting for the connection's congestion window and then for
// its turn on the shared link. A response chosen to be dropped fails after
// cut bytes.
type downBody struct {
	p    *Proxy
	ctx  context.Context
	body io.ReadCloser
	conn *tcpConn
	pace pacer
	cut  int64 // bytes to deliver before the drop; -1: no drop
	sent int64

	dropped bool
}

func (b *downBody) Read(buf []byte) (int, error) {
	if b.dropped {
		return 0, ErrDropped
	}
	n := min(len(buf), b.p.chunk)
	if b.cut >= 0 {
		if b.sent >= b.cut {
			return 0, b.drop()
		}
		n = int(min(int64(n), b.cut-b.sent))
	}
	if n == 0 {
		return 0, nil
	}
	n, opened, err := b.conn.acquire(b.ctx, &b.p.ss, n)
	if err != nil {
		return 0, err
	}
	m, rerr := b.body.Read(buf[:n])
	if b.p.ss.enabled && m < n {
		b.conn.giveBack(n - m)
	}
	if err := b.pace.send(b.ctx, m, opened); err != nil {
		return 0, err
	}
	b.sent += int64(m)
	b.p.stats.bytes.Add(int64(m))
	if rerr == io.EOF && b.cut >= 0 {
		// The length was unknown and the body ended before the cut: drop at
		// the end, so the client still misses the body's terminator.
		return m, b.drop()
	}
	return m, rerr
}

func (b *downBody) drop() error {
	b.dropped = true
	b.p.stats.dropped.Add(1)
	return ErrDropped
}

func (b *downBody) Close() error {
	if b.p.ss.enabled {
		b.conn.idle(time.Now())
	}
	return b.body.Close()
}

// upBody paces a request body over the link's other direction (links are
// full duplex: uploads do not take the download's bandwidth).
type upBody struct {
	p    *Proxy
	ctx  context.Context
	body io.ReadCloser
	pace pacer
}

func (b *upBody) Read(buf []byte) (int, error) {
	m, rerr := b.body.Read(buf[:min(len(buf), b.p.chunk)])
	if err := b.pace.send(b.ctx, m, time.Time{}); err != nil {
		return 0, err
	}
	b.p.stats.bytesUp.Add(int64(m))
	return m, rerr
}

func (b *upBody) Close() error { return b.body.Close() }
