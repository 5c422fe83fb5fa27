package wanproxy

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"sync"
	"time"

	"golang.org/x/net/netutil"
)

// shutdownGrace is how long stop lets running responses finish before it
// closes their connections.
const shutdownGrace = 2 * time.Second

// Start serves the proxy on listenAddr (e.g. "127.0.0.1:0") until stop is
// called or ctx is done, and returns the address it listens on. Requests
// are served with ctx as their parent context. stop waits for the server to
// end and returns its error; calling it again returns the same.
func (p *Proxy) Start(ctx context.Context, listenAddr string) (addr string, stop func() error, err error) {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", listenAddr)
	if err != nil {
		return "", nil, fmt.Errorf("wanproxy: listen on %s: %w", listenAddr, err)
	}
	srv := &http.Server{
		Handler:           p,
		ConnContext:       p.ConnContext,
		BaseContext:       func(net.Listener) context.Context { return ctx },
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       90 * time.Second,
		ErrorLog:          log.New(debugWriter{p.log}, "", 0),
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(netutil.LimitListener(ln, p.opts.MaxConns)) }()

	var (
		once    sync.Once
		stopErr error
	)
	stop = func() error {
		once.Do(func() {
			sctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
			defer cancel()
			if err := srv.Shutdown(sctx); err != nil {
				srv.Close()
			}
			if err := <-served; !errors.Is(err, http.ErrServerClosed) {
				stopErr = fmt.Errorf("wanproxy: serve on %s: %w", ln.Addr(), err)
			}
			p.tr.CloseIdleConnections()
		})
		return stopErr
	}
	context.AfterFunc(ctx, func() { _ = stop() })
	return ln.Addr().String(), stop, nil
}
