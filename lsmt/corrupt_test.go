package lsmt

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"testing"
)

// smallLayer is a valid committed layer for corruption tests.
func smallLayer(t testing.TB) []byte {
	t.Helper()
	rng := rand.New(rand.NewPCG(9, 9))
	_, b := committedLayer(t, 1<<20, randomOps(rng, 1<<20, 20))
	return b
}

// trailerAt returns the trailer's offset in a committed layer.
func trailerAt(b []byte) int { return len(b) - HeaderSize }

func TestOpenRejectsBadInput(t *testing.T) {
	good := smallLayer(t)
	tr := trailerAt(good)
	indexOffset := int(binary.LittleEndian.Uint64(good[tr+32:]))
	mutate := func(f func(b []byte) []byte) []byte {
		return f(bytes.Clone(good))
	}
	setEntry := func(b []byte, i int, s Segment) {
		copy(b[indexOffset+i*EntrySize:], appendSegment(nil, s))
	}
	cases := []struct {
		name string
		blob []byte
		want error
	}{
		{"empty", nil, ErrNotLSMT},
		{"truncated", good[:len(good)-100], ErrNotLSMT},
		{"header magic", mutate(func(b []byte) []byte { b[0] = 'X'; return b }), ErrNotLSMT},
		{"trailer magic", mutate(func(b []byte) []byte { b[tr+9] ^= 1; return b }), ErrNotLSMT},
		{"trailer not sealed", mutate(func(b []byte) []byte { b[tr+28] &^= FlagSealed; return b }), ErrNotLSMT},
		{"header bit in trailer", mutate(func(b []byte) []byte { b[tr+28] |= FlagHeader; return b }), ErrNotLSMT},
		{"index size over limit", mutate(func(b []byte) []byte {
			binary.LittleEndian.PutUint64(b[tr+40:], readOnlyIndexLimit+1)
			return b
		}), ErrCorruptIndex},
		{"index past trailer", mutate(func(b []byte) []byte {
			binary.LittleEndian.PutUint64(b[tr+40:], uint64(tr-indexOffset)/EntrySize+1)
			return b
		}), ErrCorruptIndex},
		{"index offset past trailer", mutate(func(b []byte) []byte {
			binary.LittleEndian.PutUint64(b[tr+32:], uint64(len(b)))
			return b
		}), ErrCorruptIndex},
		{"unsorted entries", mutate(func(b []byte) []byte {
			setEntry(b, 0, Segment{Offset: 1000, Length: 1, MOffset: 8})
			setEntry(b, 1, Segment{Offset: 10, Length: 1, MOffset: 8})
			return b
		}), ErrCorruptIndex},
		{"overlapping entries", mutate(func(b []byte) []byte {
			setEntry(b, 0, Segment{Offset: 0, Length: 10, MOffset: 8})
			setEntry(b, 1, Segment{Offset: 5, Length: 10, MOffset: 8})
			return b
		}), ErrCorruptIndex},
		{"moffset in header", mutate(func(b []byte) []byte {
			setEntry(b, 0, Segment{Offset: 0, Length: 1, MOffset: 2})
			return b
		}), ErrCorruptIndex},
		{"moffset past data", mutate(func(b []byte) []byte {
			setEntry(b, 0, Segment{Offset: 0, Length: 1, MOffset: uint64(indexOffset) / SectorSize})
			return b
		}), ErrCorruptIndex},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Open(bytes.NewReader(c.blob), int64(len(c.blob)))
			if !errors.Is(err, c.want) {
				t.Fatalf("Open = %v, want an error wrapping %v", err, c.want)
			}
			t.Log(err)
		})
	}
}

func TestOpenWritableRejectsBadInput(t *testing.T) {
	w, dataPath, indexPath := newWritable(t, 1<<20)
	if _, err := w.WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	w.Close()
	// An index file entry pointing past the data file's end.
	w, err := OpenWritable(dataPath, indexPath)
	if err != nil {
		t.Fatal(err)
	}
	w.record(Segment{Offset: 0, Length: 1, MOffset: 1 << 30})
	w.Close()
	if _, err := OpenWritable(dataPath, indexPath); !errors.Is(err, ErrCorruptIndex) {
		t.Fatalf("OpenWritable = %v, want ErrCorruptIndex", err)
	}
	// The data file given as the index file.
	if _, err := OpenWritable(dataPath, dataPath); !errors.Is(err, ErrNotLSMT) {
		t.Fatalf("OpenWritable(data, data) = %v, want ErrNotLSMT", err)
	}
}

// FuzzOpen feeds arbitrary bytes to the committed-layer reader: it must
// return an error or a layer whose every read succeeds or fails cleanly.
func FuzzOpen(f *testing.F) {
	f.Add(smallLayer(f))
	f.Add([]byte("LSMT"))
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := Open(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			return
		}
		buf := make([]byte, 64<<10)
		for _, s := range l.Index() {
			off := int64(s.Offset) * SectorSize
			l.ReadAt(buf[:min(int64(len(buf)), int64(s.Length)*SectorSize)], off)
		}
		if _, err := NewStack([]StackLayer{l, l}); err != nil {
			t.Fatal(err)
		}
	})
}
