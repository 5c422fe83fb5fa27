package blobcache

import (
	"bytes"
	"encoding/binary"
	"errors"
	"slices"
	"testing"

	"github.com/opencontainers/go-digest"
)

// metaBytes builds a meta file with the given blocks present; every page
// CRC is set to crc(page index).
func metaBytes(dgst digest.Digest, bs, size int64, complete bool, present []int64, crc func(int64) uint32) []byte {
	l := layoutFor(size, bs)
	b := make([]byte, l.size)
	copy(b, encodeHeader(dgst, bs, size, complete))
	for _, i := range present {
		binary.LittleEndian.PutUint32(b[l.marks+i*4:], markPresent)
	}
	for p := int64(0); l.crcs+p*4 < l.size; p++ {
		if crc != nil {
			binary.LittleEndian.PutUint32(b[l.crcs+p*4:], crc(p))
		}
	}
	return b
}

func TestParseMeta(t *testing.T) {
	d := digest.FromString("blob")
	crc := func(p int64) uint32 { return uint32(p*3 + 1) }
	raw := metaBytes(d, 64<<10, 200<<10, true, []int64{0, 1, 2, 3}, crc)
	m, err := parseMeta(raw)
	if err != nil {
		t.Fatal(err)
	}
	if m.digest != d || m.blockSize != 64<<10 || m.blobSize != 200<<10 || !m.complete ||
		len(m.present) != 4 || len(m.crcs) != 50 || m.crcs[49] != 148 {
		t.Errorf("parsed %+v", m)
	}
	// The complete flag is not trusted over an absent mark.
	raw = metaBytes(d, 64<<10, 200<<10, true, []int64{0, 2, 3}, crc)
	if m, err := parseMeta(raw); err != nil || m.complete || m.present[1] || !m.present[2] {
		t.Errorf("flag with a missing mark: %+v %v", m, err)
	}
	// A damaged mark reads as absent.
	raw[metaHeaderSize] ^= 1
	if m, err := parseMeta(raw); err != nil || m.present[0] {
		t.Errorf("damaged mark: %+v %v", m, err)
	}
	bad := map[string][]byte{
		"short":      raw[:100],
		"truncated":  raw[:len(raw)-1],
		"long":       append(bytes.Clone(raw), 0),
		"magic":      append([]byte("XXXXXXXX"), raw[8:]...),
		"header crc": func() []byte { b := bytes.Clone(raw); b[16] ^= 1; return b }(),
	}
	for name, b := range bad {
		if _, err := parseMeta(b); !errors.Is(err, ErrInvalidMeta) {
			t.Errorf("%s: %v, want ErrInvalidMeta", name, err)
		}
	}
	for _, bs := range []int64{1000, 2 << 10, 32 << 20} {
		if _, err := parseMeta(metaBytes(d, bs, 10, false, nil, nil)); !errors.Is(err, ErrInvalidMeta) {
			t.Errorf("block size %d accepted", bs)
		}
	}
	if _, _, _, _, err := parseHeader(encodeHeader(d, 64<<10, maxBlobSize+1, false)); !errors.Is(err, ErrInvalidMeta) {
		t.Errorf("blob size above the limit accepted")
	}
}

func FuzzParseMeta(f *testing.F) {
	d := digest.FromString("seed")
	f.Add(metaBytes(d, 64<<10, 200<<10, false, []int64{1}, func(p int64) uint32 { return uint32(p) }))
	f.Add(metaBytes(d, 4<<10, 0, true, nil, nil))
	f.Add(metaBytes(d, 64<<10, 1, true, []int64{0}, func(int64) uint32 { return 0xFFFFFFFF }))
	f.Add(encodeHeader(d, 64<<10, 1<<30, false)) // header promising 16K records, none present
	f.Add([]byte(metaMagic))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := parseMeta(data)
		if err != nil {
			if !errors.Is(err, ErrInvalidMeta) {
				t.Fatalf("error %v does not wrap ErrInvalidMeta", err)
			}
			return
		}
		// What parses re-encodes to a file that parses the same.
		var present []int64
		for i, ok := range m.present {
			if ok {
				present = append(present, int64(i))
			}
		}
		if m.complete && len(present) != len(m.present) {
			t.Fatal("complete with absent blocks")
		}
		m2, err := parseMeta(metaBytes(m.digest, m.blockSize, m.blobSize, m.complete, present, func(p int64) uint32 { return m.crcs[p] }))
		if err != nil || m2.digest != m.digest || m2.blobSize != m.blobSize || m2.complete != m.complete ||
			!slices.Equal(m2.present, m.present) || !slices.Equal(m2.crcs, m.crcs) {
			t.Fatalf("round trip: %+v %v", m2, err)
		}
	})
}
