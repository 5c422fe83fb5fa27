package bpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// ErrBadRecord reports a ring-buffer record that is not an event of the
// layout this package was built with (a stale object, or a corrupt ring).
var ErrBadRecord = errors.New("bpf: bad event record")

// Kind tells an issue event from a completion event.
type Kind uint8

const (
	// KindIssue is a request handed to the device driver (block_rq_issue).
	KindIssue Kind = 0
	// KindComplete is the completion of a request reported at issue
	// (block_rq_complete); only with [Options.Completion].
	KindComplete Kind = 1
)

// String returns "issue" or "complete".
func (k Kind) String() string {
	switch k {
	case KindIssue:
		return "issue"
	case KindComplete:
		return "complete"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Op is the set of request flags the program reports; exactly one of OpRead
// and OpWrite is set, the rest qualify it.
type Op uint32

// Values match OBD_OP_* in capture.c.
const (
	OpRead Op = 1 << iota
	OpWrite
	OpReadahead
	OpSync
	OpMeta
)

// String joins the flag names with commas: "read", "read,readahead".
func (o Op) String() string { return string(o.appendText(nil)) }

// AppendText implements encoding.TextAppender with the comma-joined flag
// names. It never fails.
func (o Op) AppendText(b []byte) ([]byte, error) { return o.appendText(b), nil }

func (o Op) appendText(b []byte) []byte {
	switch o { // what nearly every event carries, without the loop
	case OpRead:
		return append(b, "read"...)
	case OpRead | OpReadahead:
		return append(b, "read,readahead"...)
	case OpRead | OpSync:
		return append(b, "read,sync"...)
	case OpRead | OpSync | OpMeta:
		return append(b, "read,sync,meta"...)
	}
	opNames := [...]string{"read", "write", "readahead", "sync", "meta"}
	first := true
	for i, name := range opNames {
		if o&(1<<i) == 0 {
			continue
		}
		if !first {
			b = append(b, ',')
		}
		b = append(b, name...)
		first = false
	}
	if rest := o &^ (1<<len(opNames) - 1); rest != 0 {
		if !first {
			b = append(b, ',')
		}
		b = fmt.Appendf(b, "%#x", uint32(rest))
	}
	return b
}

// Event is one block request as the kernel reported it.
type Event struct {
	Kind Kind
	// Timestamp is CLOCK_MONOTONIC in nanoseconds (bpf_ktime_get_ns), taken
	// at issue, or at completion for KindComplete.
	Timestamp uint64
	Dev       Dev
	// Sector is the first 512-byte sector on the whole disk; Sectors is the
	// request length (for completions: the bytes completed, in sectors).
	Sector  uint64
	Sectors uint32
	Op      Op
	// PID (thread group id), TID, Comm and CgroupID describe the task that
	// was current when the request was issued (or completed): usually the
	// reader, but a kworker when the block layer dispatched asynchronously.
	PID      uint32
	TID      uint32
	Comm     [16]byte // NUL-padded, as the kernel's task comm
	CgroupID uint64
	// Latency and Status are set on KindComplete only; Status is 0 on
	// success.
	Latency time.Duration
	Status  int32
}

// CommString returns Comm up to its first NUL.
func (e *Event) CommString() string {
	if i := bytes.IndexByte(e.Comm[:], 0); i >= 0 {
		return string(e.Comm[:i])
	}
	return string(e.Comm[:])
}

// Byte offsets of struct obd_event in capture.c; TestEventLayout checks
// them against the bpf2go-generated struct.
const (
	offTimestamp = 0
	offSector    = 8
	offCgroup    = 16
	offLatency   = 24
	offDev       = 32
	offSectors   = 36
	offPID       = 40
	offTID       = 44
	offOp        = 48
	offStatus    = 52
	offKind      = 56
	offComm      = 64
	eventSize    = 80
)

// UnmarshalBinary decodes one ring-buffer record. It decodes by hand rather
// than through encoding/binary's reflection: this runs once per event, on a
// budget of well under a microsecond.
func (e *Event) UnmarshalBinary(b []byte) error {
	if len(b) != eventSize {
		return fmt.Errorf("%w: %d bytes, want %d", ErrBadRecord, len(b), eventSize)
	}
	le := binary.LittleEndian // the object is built for bpfel only
	kind := Kind(b[offKind])
	if kind != KindIssue && kind != KindComplete {
		return fmt.Errorf("%w: kind %d at offset %d", ErrBadRecord, kind, offKind)
	}
	*e = Event{
		Kind:      kind,
		Timestamp: le.Uint64(b[offTimestamp:]),
		Dev:       Dev(le.Uint32(b[offDev:])),
		Sector:    le.Uint64(b[offSector:]),
		Sectors:   le.Uint32(b[offSectors:]),
		Op:        Op(le.Uint32(b[offOp:])),
		PID:       le.Uint32(b[offPID:]),
		TID:       le.Uint32(b[offTID:]),
		CgroupID:  le.Uint64(b[offCgroup:]),
		Latency:   time.Duration(le.Uint64(b[offLatency:])),
		Status:    int32(le.Uint32(b[offStatus:])),
	}
	copy(e.Comm[:], b[offComm:offComm+16])
	return nil
}
