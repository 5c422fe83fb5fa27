package device

import (
	"bytes"
	"errors"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// failingReader fails every read, as a broken image would.
type failingReader struct{}

func (failingReader) ReadAt([]byte, int64) (int, error) { return 0, errors.New("broken") }

// TestImageFSProtocol drives the FUSE handlers directly, without a kernel.
func TestImageFSProtocol(t *testing.T) {
	disk := bytes.Repeat([]byte("0123456789abcdef"), 512) // 8 KiB
	fs := newImageFS(NewImage(bytes.NewReader(disk), int64(len(disk))), nil, DefaultTuning())

	var e fuse.EntryOut
	if st := fs.Lookup(nil, &fuse.InHeader{NodeId: rootIno}, "other", &e); st != fuse.ENOENT {
		t.Errorf("lookup of another name: %v", st)
	}
	if st := fs.Lookup(nil, &fuse.InHeader{NodeId: rootIno}, imageFileName, &e); !st.Ok() ||
		e.NodeId != imageIno || e.Attr.Size != uint64(len(disk)) || e.Attr.Mode&0o222 != 0 {
		t.Errorf("lookup: %v %+v", st, e)
	}
	if e.EntryTimeout() != DefaultTuning().CacheTimeout || e.AttrTimeout() != DefaultTuning().CacheTimeout {
		t.Errorf("timeouts %v, %v", e.EntryTimeout(), e.AttrTimeout())
	}
	var a fuse.AttrOut
	if st := fs.GetAttr(nil, &fuse.GetAttrIn{InHeader: fuse.InHeader{NodeId: 99}}, &a); st != fuse.ENOENT {
		t.Errorf("getattr of an unknown inode: %v", st)
	}

	var o fuse.OpenOut
	if st := fs.Open(nil, &fuse.OpenIn{InHeader: fuse.InHeader{NodeId: imageIno}, Flags: syscall.O_RDWR}, &o); st != fuse.EROFS {
		t.Errorf("open for writing of a read-only image: %v", st)
	}
	if st := fs.Open(nil, &fuse.OpenIn{InHeader: fuse.InHeader{NodeId: imageIno}}, &o); !st.Ok() || o.OpenFlags&fuse.FOPEN_KEEP_CACHE == 0 {
		t.Errorf("open: %v flags %#x, want keep-cache", st, o.OpenFlags)
	}

	buf := make([]byte, 4096)
	for _, c := range []struct {
		off  uint64
		size uint32
		want []byte
	}{
		{0, 16, disk[:16]},
		{8192 - 10, 4096, disk[8192-10:]},
		{8192, 4096, nil},
		{1 << 40, 4096, nil},
	} {
		res, st := fs.Read(nil, &fuse.ReadIn{Offset: c.off, Size: c.size}, buf)
		if !st.Ok() {
			t.Errorf("read %d at %d: %v", c.size, c.off, st)
			continue
		}
		got, _ := res.Bytes(nil)
		if !bytes.Equal(got, c.want) {
			t.Errorf("read %d at %d: %d bytes, want %d", c.size, c.off, len(got), len(c.want))
		}
	}
	if _, st := fs.Write(nil, &fuse.WriteIn{}, []byte("x")); st != fuse.EROFS {
		t.Errorf("write to a read-only image: %v", st)
	}
	if st := fs.Fallocate(nil, &fuse.FallocateIn{Mode: unix.FALLOC_FL_PUNCH_HOLE}); st != fuse.EROFS {
		t.Errorf("punch in a read-only image: %v", st)
	}

	broken := newImageFS(NewImage(failingReader{}, 8192), nil, DefaultTuning())
	if _, st := broken.Read(nil, &fuse.ReadIn{Size: 4096}, buf); st != fuse.EIO {
		t.Errorf("read of a broken image: %v, want EIO", st)
	}
}

func TestImageFSWritable(t *testing.T) {
	const size = 64 << 10
	up := &memUpper{data: make([]byte, size)}
	ov, err := NewOverlay(nil, up, size)
	if err != nil {
		t.Fatal(err)
	}
	fs := newImageFS(ov, ov, DefaultTuning())
	var o fuse.OpenOut
	if st := fs.Open(nil, &fuse.OpenIn{InHeader: fuse.InHeader{NodeId: imageIno}, Flags: syscall.O_RDWR}, &o); !st.Ok() {
		t.Fatalf("open for writing: %v", st)
	}
	// A payload split over buffers is joined into one aligned write.
	n, st := fs.Writev(nil, &fuse.WriteIn{Offset: 4096, Size: 1024}, [][]byte{bytes.Repeat([]byte{1}, 300), bytes.Repeat([]byte{2}, 724)})
	if !st.Ok() || n != 1024 {
		t.Fatalf("writev: %d, %v", n, st)
	}
	if got := up.data[4096+299 : 4096+301]; !bytes.Equal(got, []byte{1, 2}) {
		t.Errorf("joined write reads %v at the seam", got)
	}
	if _, st := fs.Write(nil, &fuse.WriteIn{Offset: size - 512}, make([]byte, 1024)); st.Ok() {
		t.Errorf("write over the end succeeded")
	}
	if st := fs.Fallocate(nil, &fuse.FallocateIn{Offset: 4096, Length: 512, Mode: unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE}); !st.Ok() {
		t.Errorf("punch hole: %v", st)
	}
	if up.data[4096+10] != 0 {
		t.Errorf("punched range not zero")
	}
	if st := fs.Fallocate(nil, &fuse.FallocateIn{Mode: unix.FALLOC_FL_COLLAPSE_RANGE, Length: 4096}); st.Ok() {
		t.Errorf("collapse range accepted")
	}
	if st := fs.Fsync(nil, &fuse.FsyncIn{}); !st.Ok() || up.syncs != 1 {
		t.Errorf("fsync: %v, %d syncs", st, up.syncs)
	}
	if fs.writes.Load() != 2 || fs.discards.Load() != 1 || fs.syncs.Load() != 1 {
		t.Errorf("counted %d writes, %d discards, %d syncs", fs.writes.Load(), fs.discards.Load(), fs.syncs.Load())
	}
}
