package device

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/obdtrace/obdtrace/lsmt"
)

func TestSpanSetMatchesBitmap(t *testing.T) {
	const size = 4096
	rng := rand.New(rand.NewPCG(3, 4))
	s := newSpanSet()
	var model [size]bool
	for i := range 2000 {
		start := rng.Int64N(size)
		end := min(size, start+rng.Int64N(64))
		s.add(start, end)
		for j := start; j < end; j++ {
			model[j] = true
		}
		if i%50 != 0 {
			continue
		}
		var got [size]bool
		prevEnd := int64(-1)
		for _, sp := range s.appendOverlapping(nil, 0, size) {
			if sp.start <= prevEnd {
				t.Fatalf("spans not disjoint and apart: %v after end %d", sp, prevEnd)
			}
			prevEnd = sp.end
			for j := sp.start; j < sp.end; j++ {
				got[j] = true
			}
		}
		if got != model {
			t.Fatalf("after %d adds the set differs from the model", i+1)
		}
		// A window clips the spans it overlaps.
		from := rng.Int64N(size)
		to := min(size, from+rng.Int64N(200)+1)
		for _, sp := range s.appendOverlapping(nil, from, to) {
			if sp.start < from || sp.end > to || sp.start >= sp.end {
				t.Fatalf("window [%d,%d) gave %v", from, to, sp)
			}
		}
	}
	if s.len() == 0 {
		t.Fatal("empty set after adds")
	}
}

// memUpper is an in-memory Upper that checks the alignment lsmt demands.
type memUpper struct {
	data  []byte
	index []lsmt.Segment
	syncs int
}

func (m *memUpper) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.data)) {
		return 0, io.EOF
	}
	n := copy(p, m.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memUpper) WriteAt(p []byte, off int64) (int, error) {
	if off%512 != 0 || len(p)%512 != 0 {
		return 0, lsmt.ErrAlignment
	}
	m.index = append(m.index, lsmt.Segment{Offset: uint64(off / 512), Length: uint32(len(p) / 512)})
	return copy(m.data[off:], p), nil
}

func (m *memUpper) Discard(off, n int64) error {
	if off%512 != 0 || n%512 != 0 {
		return lsmt.ErrAlignment
	}
	clear(m.data[off : off+n])
	m.index = append(m.index, lsmt.Segment{Offset: uint64(off / 512), Length: uint32(n / 512), Zeroed: true})
	return nil
}

func (m *memUpper) Sync() error           { m.syncs++; return nil }
func (m *memUpper) Index() []lsmt.Segment { return m.index }

// checkOverlay applies random writes and discards, aligned or not, to o and
// to a flat model of the disk, and compares random reads.
func checkOverlay(t *testing.T, o *Overlay, model []byte, rng *rand.Rand, ops int) {
	t.Helper()
	size := int64(len(model))
	for i := range ops {
		off := rng.Int64N(size)
		n := min(size-off, rng.Int64N(20000))
		if rng.IntN(2) == 0 { // sector aligned, as the loop driver sends
			off, n = off/512*512, n/512*512
		}
		switch rng.IntN(3) {
		case 0, 1:
			p := make([]byte, n)
			for j := range p {
				p[j] = byte(rng.Uint32())
			}
			if _, err := o.WriteAt(p, off); err != nil {
				t.Fatalf("op %d: WriteAt(%d, %d): %v", i, n, off, err)
			}
			copy(model[off:], p)
		case 2:
			if err := o.Discard(off, n); err != nil {
				t.Fatalf("op %d: Discard(%d, %d): %v", i, off, n, err)
			}
			clear(model[off : off+n])
		}
		roff := rng.Int64N(size)
		buf := make([]byte, min(size-roff, rng.Int64N(30000)+1))
		if _, err := o.ReadAt(buf, roff); err != nil && !errors.Is(err, io.EOF) {
			t.Fatalf("op %d: ReadAt: %v", i, err)
		}
		if !bytes.Equal(buf, model[roff:roff+int64(len(buf))]) {
			j := 0
			for buf[j] == model[roff+int64(j)] {
				j++
			}
			t.Fatalf("op %d: %d bytes at %d differ from the model, first at %d: spans %v", i, len(buf), roff, roff+int64(j), o.owned.appendOverlapping(nil, 0, size))
		}
	}
}

func randomBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func TestOverlayMatchesModel(t *testing.T) {
	const size = 1 << 20
	rng := rand.New(rand.NewPCG(5, 6))
	lower := randomBytes(rng, size-3000) // shorter than the disk: the rest reads as zeros
	model := append(bytes.Clone(lower), make([]byte, 3000)...)
	up := &memUpper{data: make([]byte, size)}
	o, err := NewOverlay(bytes.NewReader(lower), up, size)
	if err != nil {
		t.Fatal(err)
	}
	checkOverlay(t, o, model, rng, 400)
	if err := o.Sync(); err != nil || up.syncs != 1 {
		t.Errorf("Sync: %v, upper synced %d times", err, up.syncs)
	}
	if o.Size() != size {
		t.Errorf("Size %d", o.Size())
	}
	// A new overlay over the same upper layer shadows what it shadowed.
	o2, err := NewOverlay(bytes.NewReader(lower), up, size)
	if err != nil {
		t.Fatal(err)
	}
	checkOverlay(t, o2, model, rng, 50)
}

// TestOverlayLSMTWritable runs the model check on a real writable LSMT
// layer over a lower disk, then reopens the layer from its files.
func TestOverlayLSMTWritable(t *testing.T) {
	const size = 4 << 20
	rng := rand.New(rand.NewPCG(7, 8))
	lower := randomBytes(rng, size)
	model := bytes.Clone(lower)
	dir := t.TempDir()
	data, idx := filepath.Join(dir, "data"), filepath.Join(dir, "index")
	w, err := lsmt.CreateWritable(data, idx, lsmt.WritableOptions{VirtualSize: size})
	if err != nil {
		t.Fatal(err)
	}
	o, err := NewOverlay(bytes.NewReader(lower), w, size)
	if err != nil {
		t.Fatal(err)
	}
	checkOverlay(t, o, model, rng, 300)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	w2, err := lsmt.OpenWritable(data, idx)
	if err != nil {
		t.Fatal(err)
	}
	defer w2.Close()
	o2, err := NewOverlay(bytes.NewReader(lower), w2, size)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if _, err := o2.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("the reopened layer over its lower reads differently")
	}
}

func TestOverlayBadInput(t *testing.T) {
	up := &memUpper{data: make([]byte, 8192)}
	for _, size := range []int64{0, -512, 1000} {
		if _, err := NewOverlay(nil, up, size); !errors.Is(err, ErrSize) {
			t.Errorf("NewOverlay size %d: %v, want ErrSize", size, err)
		}
	}
	o, err := NewOverlay(nil, up, 8192)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1024)
	if _, err := o.ReadAt(buf, -1); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("read at -1: %v", err)
	}
	if n, err := o.ReadAt(buf, 8192); n != 0 || err != io.EOF {
		t.Errorf("read at the end: %d, %v, want 0, EOF", n, err)
	}
	if n, err := o.ReadAt(buf, 8192-100); n != 100 || err != io.EOF {
		t.Errorf("read over the end: %d, %v, want 100, EOF", n, err)
	}
	if _, err := o.WriteAt(buf, 8192-100); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("write over the end: %v", err)
	}
	if _, err := o.WriteAt(buf, -512); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("write at -512: %v", err)
	}
	if err := o.Discard(4096, 8192); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("discard over the end: %v", err)
	}
	if err := o.Discard(0, -1); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("negative discard: %v", err)
	}
	if n, err := o.WriteAt(nil, 0); n != 0 || err != nil {
		t.Errorf("empty write: %d, %v", n, err)
	}
}

func TestAttachRefusesBadInput(t *testing.T) {
	ctx := context.Background()
	ro := NewImage(bytes.NewReader(make([]byte, 8192)), 8192)
	cases := []struct {
		name string
		img  Image
		opts Options
		want error
	}{
		{"writable without WriteAt", ro, Options{Writable: true}, ErrNotWritable},
		{"size not sectors", NewImage(bytes.NewReader(nil), 1000), Options{}, ErrSize},
		{"empty", NewImage(bytes.NewReader(nil), 0), Options{}, ErrSize},
		{"block size", ro, Options{Tuning: &Tuning{LoopBlockSize: 3000}}, ErrSize},
		{"size not blocks", NewImage(bytes.NewReader(nil), 8704), Options{Tuning: &Tuning{LoopBlockSize: 4096}}, ErrSize},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d, err := FUSELoop{}.Attach(ctx, c.img, c.opts)
			if !errors.Is(err, c.want) {
				t.Errorf("Attach: %v, want %v", err, c.want)
			}
			if d != nil {
				d.Close()
			}
		})
	}
}
