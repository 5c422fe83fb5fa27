package backstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/snapshotter/backstore/device"
)

// Bounds on the control socket's handlers: a peer that connects and sends
// nothing holds one for controlReadTimeout, so without a bound a stream of
// such peers would grow goroutines and descriptors without end.
const (
	// maxControlHandlers bounds the requests handled at once; real
	// clients send one at a time per container start.
	maxControlHandlers = 8
	// controlBusyWait is how long a connection over the bound waits for
	// a handler to end before it is refused.
	controlBusyWait = time.Second
	// controlRefuseTimeout bounds the refusal of a connection: reading
	// its request (closing over an unread one would reset the peer
	// before it reads the answer) and writing the answer.
	controlRefuseTimeout = 200 * time.Millisecond
)

// errControlBusy answers a connection over maxControlHandlers.
var errControlBusy = fmt.Errorf("%d control requests are being handled; try again", maxControlHandlers)

// controller runs the recordings and replays of one served image, whether
// asked for at mount (Config.TraceFile) or later on the control socket.
type controller struct {
	ctx    context.Context // ends when the server stops
	cancel context.CancelFunc
	cfg    Config
	img    *Image
	dev    device.Device
	mon    *monitor
	rp     *replays
	log    zerolog.Logger

	ln       *net.UnixListener
	handlers sync.WaitGroup
	slots    chan struct{} // one per running handler, at most maxControlHandlers

	mu         sync.Mutex
	closed     bool                  // no new recordings
	recordings map[string]*recording // by trace path
}

func newController(ctx context.Context, cfg Config, img *Image, dev device.Device, rp *replays, mon *monitor, log zerolog.Logger) *controller {
	ctx, cancel := context.WithCancel(ctx)
	return &controller{ctx: ctx, cancel: cancel, cfg: cfg, img: img, dev: dev, rp: rp, mon: mon, log: log,
		recordings: map[string]*recording{}, slots: make(chan struct{}, maxControlHandlers)}
}

// startRecording records the device's reads into path, an existing empty
// file, for at most maxDuration (0 = no bound).
func (c *controller) startRecording(path string, maxDuration time.Duration) error {
	mode, err := TraceModeOf(path)
	if err != nil {
		return err
	}
	if mode != TraceRecord {
		return fmt.Errorf("%s is not an existing empty file: nothing to record into", path)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrStopping
	}
	if _, ok := c.recordings[path]; ok {
		return fmt.Errorf("already recording into %s", path)
	}
	r, err := startRecording(c.ctx, path, c.img, c.dev, maxDuration, c.log)
	if err != nil {
		return err
	}
	c.recordings[path] = r
	go func() {
		<-r.done
		c.forget(path, r)
	}()
	return nil
}

// forget drops the ended recording r into path.
func (c *controller) forget(path string, r *recording) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.recordings[path] == r {
		delete(c.recordings, path)
	}
}

// stopRecording ends the recording into path and waits for its trace. A
// recording that has ended is not running, even if not forgotten yet.
func (c *controller) stopRecording(path string) error {
	c.mu.Lock()
	r, ok := c.recordings[path]
	c.mu.Unlock()
	if ok {
		select {
		case <-r.done:
			ok = false
		default:
		}
	}
	if !ok {
		return ErrNotRecording
	}
	err := r.stop()
	c.forget(path, r)
	return err
}

// replay checks the trace or path list in path and replays it in the
// background, as a trace given at mount is. It is refused with
// ErrReplayRunning while another replay runs.
func (c *controller) replay(path string) error {
	if c.cfg.NoReplay {
		return errors.New("replay is disabled on this server")
	}
	mode, err := CheckTraceFile(path)
	if err != nil {
		return err
	}
	if mode != TraceReplay {
		return fmt.Errorf("%s holds no trace to replay", path)
	}
	cfg := c.cfg
	cfg.TraceFile = path
	return c.rp.start(cfg, c.img, c.mon, c.log)
}

// listen serves the control socket at path (mode 0600) until close.
func (c *controller) listen(path string) error {
	os.Remove(path) // a dead server's socket
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return fmt.Errorf("backstore: control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("backstore: control socket: %w", err)
	}
	c.ln = ln
	c.handlers.Add(1)
	go func() {
		defer c.handlers.Done()
		for {
			conn, err := ln.AcceptUnix()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					c.log.Error().Err(err).Msg("control socket")
				}
				return
			}
			if err := c.acquire(); err != nil {
				c.refuse(conn, err)
				continue
			}
			c.handlers.Add(1)
			go func() {
				defer c.handlers.Done()
				defer func() { <-c.slots }()
				c.handle(conn)
			}()
		}
	}()
	return nil
}

// acquire takes a handler slot, waiting at most controlBusyWait.
func (c *controller) acquire() error {
	select {
	case c.slots <- struct{}{}:
		return nil
	default:
	}
	t := time.NewTimer(controlBusyWait)
	defer t.Stop()
	select {
	case c.slots <- struct{}{}:
		return nil
	case <-c.ctx.Done():
		return ErrStopping
	case <-t.C:
		c.log.Warn().Int("handlers", maxControlHandlers).Msg("control request refused: too many at once")
		return errControlBusy
	}
}

// refuse answers conn with err without reading its request, within
// controlRefuseTimeout.
func (c *controller) refuse(conn *net.UnixConn, err error) {
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(controlRefuseTimeout))
	io.Copy(io.Discard, io.LimitReader(conn, MaxControlMessage+1))
	writeResponse(conn, err)
}

// handle answers one request.
func (c *controller) handle(conn *net.UnixConn) {
	defer conn.Close()
	// A peer that sends nothing must not hold up close for the read
	// deadline.
	defer context.AfterFunc(c.ctx, func() { conn.SetDeadline(time.Now()) })()
	req, err := c.readRequest(conn)
	if err == nil {
		log := c.log.With().Str("op", req.Op).Str("trace", req.Path).Logger()
		log.Info().Msg("control request")
		switch req.Op {
		case OpRecord:
			err = c.startRecording(req.Path, req.MaxDuration)
		case OpStopRecord:
			err = c.stopRecording(req.Path)
		case OpReplay:
			err = c.replay(req.Path)
		}
		if err != nil {
			log.Warn().Err(err).Msg("control request failed")
		}
	} else {
		c.log.Warn().Err(err).Msg("bad control request")
	}
	conn.SetWriteDeadline(time.Now().Add(controlReadTimeout))
	writeResponse(conn, err)
}

// writeResponse answers a request with err, nil for success. A peer that
// has gone is not this server's problem.
func writeResponse(conn *net.UnixConn, err error) {
	var resp ControlResponse
	if err != nil {
		resp.Error = err.Error()
		resp.NotRecording = errors.Is(err, ErrNotRecording)
		resp.ReplayRunning = errors.Is(err, ErrReplayRunning)
	}
	b, _ := json.Marshal(resp)
	conn.Write(b)
}

// readRequest reads one request from a peer running as root or as this
// server's user.
func (c *controller) readRequest(conn *net.UnixConn) (ControlRequest, error) {
	if err := checkPeer(conn); err != nil {
		return ControlRequest{}, err
	}
	conn.SetReadDeadline(time.Now().Add(controlReadTimeout))
	data, err := io.ReadAll(io.LimitReader(conn, MaxControlMessage+1))
	if err != nil {
		return ControlRequest{}, fmt.Errorf("%w: %w", ErrControlMessage, err)
	}
	return ParseControlRequest(data)
}

// checkPeer refuses a peer that is neither root nor this process's user.
// The socket's mode already says so; this also holds if the state
// directory's permissions were loosened.
func checkPeer(conn *net.UnixConn) error {
	raw, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return fmt.Errorf("backstore: control: peer credentials: %w", cerr)
	}
	if cred.Uid != 0 && int(cred.Uid) != os.Geteuid() {
		return fmt.Errorf("%w: peer uid %d may not control this server", ErrControlRefused, cred.Uid)
	}
	return nil
}

// close stops serving the socket and ends every recording, waiting for
// their traces. Cancelling the controller's context ends the recordings
// and the requests being read at once.
func (c *controller) close() error {
	if c.ln != nil {
		c.ln.Close()
	}
	c.mu.Lock()
	c.closed = true
	recs := make([]*recording, 0, len(c.recordings))
	for _, r := range c.recordings {
		recs = append(recs, r)
	}
	c.mu.Unlock()
	c.cancel()
	c.handlers.Wait()
	for _, r := range recs {
		r.stop() // a failure is logged by the recording
	}
	return nil
}
