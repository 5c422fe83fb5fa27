package backstore

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"time"
)

// The control channel lets the process that started an image server ask it
// for work on the device it already serves: a second container of the
// image may want a recording or a replay long after the device came up.
// It is a unix socket in the mount's state directory (mode 0600, root's
// only), one request per connection: the client writes one JSON object and
// shuts its side down, the server answers with one JSON object.

// Control operations.
const (
	// OpRecord starts recording the device's reads into Path (an existing,
	// empty file, by upstream's rules). It ends when Path.lock is deleted,
	// MaxDuration passes, OpStopRecord names Path, or the server stops.
	OpRecord = "record"
	// OpStopRecord ends the recording into Path and answers once the trace
	// is written (Path.ok exists).
	OpStopRecord = "stop-record"
	// OpReplay replays the trace or path list in Path.
	OpReplay = "replay"
)

// Limits of the control protocol.
const (
	// MaxControlMessage bounds a request or response; real ones are a few
	// hundred bytes.
	MaxControlMessage = 16 << 10
	// maxControlPath bounds a path in a request (PATH_MAX).
	maxControlPath = 4096
	// controlSocketName is the socket's name in the state directory.
	controlSocketName = "ctl.sock"
	// maxUnixPath is the longest socket path sockaddr_un holds.
	maxUnixPath = 107
	// controlReadTimeout bounds how long a server waits for a request.
	controlReadTimeout = 5 * time.Second
	// DefaultControlTimeout bounds a request when ctx has no deadline: a
	// stop waits for the trace to be written.
	DefaultControlTimeout = time.Minute
)

// Control errors.
var (
	// ErrControlMessage means a request or response is malformed.
	ErrControlMessage = errors.New("backstore: bad control message")
	// ErrControlRefused means the server understood a request and refused
	// it; the error says why.
	ErrControlRefused = errors.New("backstore: control request refused")
	// ErrNoControl means a server has no control channel (an older server,
	// or a state directory too deep for a unix socket path).
	ErrNoControl = errors.New("backstore: image server has no control channel")
	// ErrNotRecording answers OpStopRecord for a path nothing records into.
	ErrNotRecording = errors.New("not recording into this path")
)

// ControlRequest is one request on the control channel.
type ControlRequest struct {
	Op   string `json:"op"`
	Path string `json:"path"`
	// MaxDuration bounds an OpRecord; 0 = no bound.
	MaxDuration time.Duration `json:"max_duration,omitempty"`
}

// ControlResponse answers a ControlRequest: Error is empty on success.
type ControlResponse struct {
	Error string `json:"error,omitempty"`
	// NotRecording is set when Error is ErrNotRecording's.
	NotRecording bool `json:"not_recording,omitempty"`
	// ReplayRunning is set when a replay was refused because another runs
	// (ErrReplayRunning): a transient refusal, unlike the others.
	ReplayRunning bool `json:"replay_running,omitempty"`
}

// ParseControlRequest decodes and checks a request read from the control
// socket: one JSON object of at most MaxControlMessage bytes, a known
// operation, an absolute clean path without NUL of at most 4096 bytes.
func ParseControlRequest(data []byte) (ControlRequest, error) {
	var req ControlRequest
	if err := decodeControl(data, &req); err != nil {
		return ControlRequest{}, err
	}
	switch req.Op {
	case OpRecord, OpStopRecord, OpReplay:
	default:
		return ControlRequest{}, fmt.Errorf("%w: unknown op %q", ErrControlMessage, truncate(req.Op, 32))
	}
	if err := checkControlPath(req.Path); err != nil {
		return ControlRequest{}, err
	}
	if req.MaxDuration < 0 {
		return ControlRequest{}, fmt.Errorf("%w: negative max_duration %v", ErrControlMessage, req.MaxDuration)
	}
	if req.MaxDuration != 0 && req.Op != OpRecord {
		return ControlRequest{}, fmt.Errorf("%w: max_duration with op %q", ErrControlMessage, req.Op)
	}
	return req, nil
}

// parseControlResponse decodes a server's answer.
func parseControlResponse(data []byte) (ControlResponse, error) {
	var resp ControlResponse
	err := decodeControl(data, &resp)
	return resp, err
}

// decodeControl decodes exactly one JSON object, rejecting unknown fields
// and trailing data.
func decodeControl(data []byte, v any) error {
	if len(data) > MaxControlMessage {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrControlMessage, len(data), MaxControlMessage)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %w", ErrControlMessage, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: data after the JSON object at byte %d", ErrControlMessage, dec.InputOffset())
	}
	return nil
}

func checkControlPath(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("%w: no path", ErrControlMessage)
	case len(p) > maxControlPath:
		return fmt.Errorf("%w: path of %d bytes, at most %d", ErrControlMessage, len(p), maxControlPath)
	case strings.IndexByte(p, 0) >= 0:
		return fmt.Errorf("%w: path %q holds a NUL byte", ErrControlMessage, truncate(p, 80))
	case !filepath.IsAbs(p) || filepath.Clean(p) != p:
		return fmt.Errorf("%w: path %q is not absolute and clean", ErrControlMessage, truncate(p, 80))
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// controlSocketPath is the control socket of the mount whose state lives
// in stateDir, or ErrNoControl when the path is too long for a socket.
func controlSocketPath(stateDir string) (string, error) {
	p := filepath.Join(stateDir, controlSocketName)
	if len(p) > maxUnixPath {
		return "", fmt.Errorf("%w: socket path %s is over %d bytes", ErrNoControl, p, maxUnixPath)
	}
	return p, nil
}

// SendControl sends req to the image server whose state is st and waits
// for its answer. A refusal wraps ErrControlRefused (and ErrNotRecording
// or ErrReplayRunning when that is why).
func SendControl(ctx context.Context, st State, req ControlRequest) error {
	if st.Control == "" {
		return fmt.Errorf("%w (server pid %d)", ErrNoControl, st.PID)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultControlTimeout)
		defer cancel()
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", st.Control)
	if err != nil {
		return fmt.Errorf("backstore: control: %w", err)
	}
	conn := c.(*net.UnixConn)
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	if _, err := conn.Write(b); err != nil {
		return fmt.Errorf("backstore: control: send %s: %w", req.Op, err)
	}
	if err := conn.CloseWrite(); err != nil {
		return fmt.Errorf("backstore: control: %w", err)
	}
	data, err := io.ReadAll(io.LimitReader(conn, MaxControlMessage+1))
	if err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return fmt.Errorf("backstore: control: %s %s: %w", req.Op, req.Path, err)
	}
	resp, err := parseControlResponse(data)
	if err != nil {
		return fmt.Errorf("backstore: control: answer to %s: %w", req.Op, err)
	}
	switch {
	case resp.NotRecording:
		return fmt.Errorf("%w: %s %s: %w", ErrControlRefused, req.Op, req.Path, ErrNotRecording)
	case resp.ReplayRunning:
		return fmt.Errorf("%w: %s %s: %w: %s", ErrControlRefused, req.Op, req.Path, ErrReplayRunning, resp.Error)
	case resp.Error != "":
		return fmt.Errorf("%w: %s %s: %s", ErrControlRefused, req.Op, req.Path, resp.Error)
	}
	return nil
}
