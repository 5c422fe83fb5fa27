package bpf

import (
	"encoding/binary"
	"errors"
	"testing"
	"unsafe"
)

// The hand-written offsets in event.go must match what clang laid out; the
// bpf2go-generated struct mirrors the object's BTF.
func TestEventLayout(t *testing.T) {
	var (
		e     captureObdEvent
		stage captureObdStage
		head  captureObdHead
	)
	checks := []struct {
		name      string
		got, want uintptr
	}{
		{"ts_ns", unsafe.Offsetof(e.TsNs), offTimestamp},
		{"sector", unsafe.Offsetof(e.Sector), offSector},
		{"cgroup_id", unsafe.Offsetof(e.CgroupId), offCgroup},
		{"latency_ns", unsafe.Offsetof(e.LatencyNs), offLatency},
		{"dev", unsafe.Offsetof(e.Dev), offDev},
		{"sectors", unsafe.Offsetof(e.Sectors), offSectors},
		{"pid", unsafe.Offsetof(e.Pid), offPID},
		{"tid", unsafe.Offsetof(e.Tid), offTID},
		{"op", unsafe.Offsetof(e.Op), offOp},
		{"status", unsafe.Offsetof(e.Status), offStatus},
		{"kind", unsafe.Offsetof(e.Kind), offKind},
		{"comm", unsafe.Offsetof(e.Comm), offComm},
		{"size", unsafe.Sizeof(e), eventSize},
		{"obd_hdr size", unsafe.Sizeof(captureObdHdr{}), hdrSize},
		{"obd_stage ev", unsafe.Offsetof(stage.Ev), hdrSize},
		{"obd_stage ev length", uintptr(len(stage.Ev)), maxBatchLen},
		{"obd_head count", unsafe.Offsetof(head.Count), 4},
		{"obd_head first_ns", unsafe.Offsetof(head.FirstNs), 8},
		{"obd_head size", unsafe.Sizeof(head), batchHeadSize},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("struct obd_event %s at %d, event.go says %d", c.name, c.got, c.want)
		}
	}
}

func TestHasCaps(t *testing.T) {
	bit := func(caps ...int) uint64 {
		var m uint64
		for _, c := range caps {
			m |= 1 << c
		}
		return m
	}
	const sysAdmin, perfmon, bpfCap, netAdmin = 21, 38, 39, 12
	for _, c := range []struct {
		eff  uint64
		want bool
	}{
		{0, false},
		{bit(bpfCap), false},
		{bit(perfmon), false},
		{bit(bpfCap, perfmon), true},
		{bit(sysAdmin), true},
		{bit(netAdmin, bpfCap), false},
		{^uint64(0), true},
	} {
		if got := hasCaps(c.eff); got != c.want {
			t.Errorf("hasCaps(%#x) = %v, want %v", c.eff, got, c.want)
		}
	}
}

func TestCheckRingSize(t *testing.T) {
	for _, c := range []struct {
		in   int
		want uint32
		ok   bool
	}{
		{0, DefaultRingSize, true},
		{4096, 4096, true},
		{1 << 24, 1 << 24, true},
		{4095, 0, false},
		{3 << 20, 0, false},
		{-4096, 0, false},
		{1 << 31, 0, false},
	} {
		got, err := checkRingSize(c.in)
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("checkRingSize(%d) = %d, %v; want %d, ok=%v", c.in, got, err, c.want, c.ok)
		}
		if err != nil && !errors.Is(err, ErrBadRingSize) {
			t.Errorf("checkRingSize(%d): %v does not wrap ErrBadRingSize", c.in, err)
		}
	}
}

func TestUnmarshalBinary(t *testing.T) {
	b := make([]byte, eventSize)
	le := binary.LittleEndian
	le.PutUint64(b[offTimestamp:], 123456789)
	le.PutUint64(b[offSector:], 1<<40)
	le.PutUint64(b[offCgroup:], 77)
	le.PutUint64(b[offLatency:], 5000)
	le.PutUint32(b[offDev:], 7<<20|3)
	le.PutUint32(b[offSectors:], 256)
	le.PutUint32(b[offPID:], 42)
	le.PutUint32(b[offTID:], 43)
	le.PutUint32(b[offOp:], uint32(OpRead|OpReadahead))
	le.PutUint32(b[offStatus:], uint32(0xfffffffb)) // -5
	b[offKind] = byte(KindComplete)
	copy(b[offComm:], "fio\x00garbage")
	var ev Event
	if err := ev.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	want := Event{Kind: KindComplete, Timestamp: 123456789, Dev: 7<<20 | 3, Sector: 1 << 40, Sectors: 256,
		Op: OpRead | OpReadahead, PID: 42, TID: 43, CgroupID: 77, Latency: 5000, Status: -5}
	copy(want.Comm[:], "fio\x00garbage")
	if ev != want {
		t.Fatalf("got %+v\nwant %+v", ev, want)
	}
	if ev.CommString() != "fio" || ev.Dev.String() != "7:3" || ev.Op.String() != "read,readahead" {
		t.Errorf("CommString %q, Dev %s, Op %s", ev.CommString(), ev.Dev, ev.Op)
	}
	if err := ev.UnmarshalBinary(b[:eventSize-1]); !errors.Is(err, ErrBadRecord) {
		t.Errorf("short record: %v, want ErrBadRecord", err)
	}
	b[offKind] = 9
	if err := ev.UnmarshalBinary(b); !errors.Is(err, ErrBadRecord) {
		t.Errorf("kind 9: %v, want ErrBadRecord", err)
	}
}

// FuzzUnmarshalBinary: any bytes from the ring decode or fail cleanly, and
// what decodes formats without trouble.
func FuzzUnmarshalBinary(f *testing.F) {
	f.Add(make([]byte, eventSize))
	f.Add([]byte{1, 2, 3})
	full := make([]byte, eventSize)
	for i := range full {
		full[i] = 0xff
	}
	full[offKind] = 1
	f.Add(full)
	f.Fuzz(func(t *testing.T, b []byte) {
		var ev Event
		if err := ev.UnmarshalBinary(b); err != nil {
			if !errors.Is(err, ErrBadRecord) {
				t.Fatalf("error %v does not wrap ErrBadRecord", err)
			}
			return
		}
		if len(b) != eventSize {
			t.Fatalf("accepted %d bytes", len(b))
		}
		_ = ev.Op.String() + ev.Dev.String() + ev.Kind.String() + ev.CommString()
	})
}

// A slot names its device only when that device alone hashes there and
// cannot be mistaken for an empty slot or the marker; otherwise it sends
// the program to the hash map. Removing one of two devices sharing a slot
// hands the slot to the other.
func TestSlotValue(t *testing.T) {
	set := map[Dev]struct{}{}
	for minor := range uint32(64) {
		set[Dev(7<<minorBits|minor)] = struct{}{}
	}
	var member, twin Dev // a device outside the set sharing a member's slot
	for cand := Dev(259 << minorBits); twin == 0; cand++ {
		for d := range set {
			if devHash(d) == devHash(cand) {
				member, twin = d, cand
				break
			}
		}
	}
	for d := range set {
		if v := slotValue(set, devHash(d)); v != uint32(d) && !(v == slotShared && d == member) {
			t.Fatalf("slot of %s holds %#x", d, v)
		}
	}
	set[twin] = struct{}{}
	if v := slotValue(set, devHash(twin)); v != slotShared {
		t.Fatalf("slot shared by %s and %s holds %#x, want the marker", member, twin, v)
	}
	delete(set, member)
	if v := slotValue(set, devHash(twin)); v != uint32(twin) {
		t.Fatalf("after removing %s its slot holds %#x, want %s", member, v, twin)
	}
	if v := slotValue(nil, devHash(twin)); v != 0 {
		t.Fatalf("empty set: slot holds %#x", v)
	}
	for _, odd := range []Dev{0, Dev(slotShared)} {
		if v := slotValue(map[Dev]struct{}{odd: {}}, devHash(odd)); v != slotShared {
			t.Errorf("device %#x alone in its slot: %#x, want the marker", uint32(odd), v)
		}
	}
	if h := devHash(Dev(^uint32(0))); h >= numSlots {
		t.Fatalf("devHash out of range: %d", h)
	}
}
