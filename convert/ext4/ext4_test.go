package ext4

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"github.com/obdtrace/obdtrace/internal/testutil"
)

// memDisk is a disk in memory.
type memDisk []byte

func (d memDisk) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= int64(len(d)) {
		return 0, io.EOF
	}
	n := copy(p, d[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (d memDisk) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > int64(len(d)) {
		return 0, errors.New("write outside the disk")
	}
	return copy(d[off:], p), nil
}

// Geometry of the synthetic filesystem: 1 KiB blocks, one group of 256
// blocks, 16 inodes of 256 bytes (inode table at blocks 5-8), a journal of
// 50 blocks at block 100 mapped by inode 8.
const (
	synBS          = 1024
	synBlocks      = 256
	synInodeTable  = 5
	synInodeBitmap = 4
	synJournal     = 100
)

var le = binary.LittleEndian

// synInode returns the bytes of inode ino in img.
func synInode(img []byte, ino int) []byte {
	off := synInodeTable*synBS + (ino-1)*256
	return img[off : off+256]
}

// buildImage makes a small, valid ext4 image: inodes 1-11 in use (2 the
// root, 8 the journal, 11 a file with clock-set fields), inode 12 freed
// with stale fields.
func buildImage() []byte {
	img := make([]byte, synBlocks*synBS)
	sb := img[SuperblockOffset : SuperblockOffset+SuperblockSize]
	le.PutUint32(sb[0x0:], 16)          // inodes
	le.PutUint32(sb[0x4:], synBlocks)   // blocks
	le.PutUint32(sb[0x14:], 1)          // first data block
	le.PutUint32(sb[0x18:], 0)          // 1 KiB blocks
	le.PutUint32(sb[0x20:], 8192)       // blocks per group
	le.PutUint32(sb[0x28:], 16)         // inodes per group
	le.PutUint32(sb[0x2C:], 1700000000) // s_mtime
	le.PutUint16(sb[0x34:], 3)          // mount count
	le.PutUint16(sb[0x38:], 0xEF53)
	le.PutUint16(sb[0x3A:], 1) // clean
	le.PutUint32(sb[0x4C:], 1) // dynamic revision
	le.PutUint16(sb[0x58:], 256)
	le.PutUint32(sb[0x5C:], compatHasJournal)
	le.PutUint32(sb[0x60:], 0x2|0x40) // filetype, extents
	le.PutUint32(sb[0xE0:], 8)
	copy(sb[0x88:], "/before")
	gd := img[2*synBS:]
	le.PutUint32(gd[0x0:], 3)
	le.PutUint32(gd[0x4:], synInodeBitmap)
	le.PutUint32(gd[0x8:], synInodeTable)
	img[synInodeBitmap*synBS] = 0xFF   // inodes 1-8
	img[synInodeBitmap*synBS+1] = 0x07 // 9-11
	for _, ino := range []int{2, 11} {
		in := synInode(img, ino)
		le.PutUint16(in[0:], 0o40755)
		le.PutUint32(in[iCtime:], 2000)
		le.PutUint32(in[iMtime:], 1000)
		le.PutUint32(in[iVersionLo:], 7)
		le.PutUint32(in[iGeneration:], 0xDEADBEEF)
		le.PutUint16(in[iExtraIsize:], 32)
		le.PutUint32(in[iCtimeExtra:], 44)
		le.PutUint32(in[iMtimeExtra:], 88)
		le.PutUint32(in[iCrtime:], 3000)
		le.PutUint32(in[iCrtimeXtra:], 99)
		le.PutUint32(in[iVersionHi:], 5)
	}
	j := synInode(img, 8)
	le.PutUint16(j[0:], 0o100600)
	le.PutUint32(j[0x20:], inodeFlagExtents)
	eh := j[0x28:]
	le.PutUint16(eh[0:], extentMagic)
	le.PutUint16(eh[2:], 1) // entries
	le.PutUint16(eh[4:], 4) // max
	le.PutUint32(eh[12+0:], 0)
	le.PutUint16(eh[12+4:], 50)
	le.PutUint32(eh[12+8:], synJournal)
	dead := synInode(img, 12)
	le.PutUint32(dead[0x14:], 12345) // dtime
	le.PutUint32(dead[iCtime:], 12345)
	return img
}

func TestOpenSynthetic(t *testing.T) {
	img := buildImage()
	fs, err := Open(memDisk(img))
	if err != nil {
		t.Fatal(err)
	}
	if fs.SB.BlockSize != synBS || len(fs.Groups) != 1 || fs.Groups[0].InodeTable != synInodeTable || fs.InodeTableBlocks() != 4 {
		t.Fatalf("geometry: %+v, groups %+v", fs.SB, fs.Groups)
	}
	ext, err := fs.JournalExtents(memDisk(img))
	if err != nil {
		t.Fatal(err)
	}
	if len(ext) != 1 || ext[0] != (Extent{Start: synJournal, Len: 50}) {
		t.Errorf("journal extents %v, want [{100 50}]", ext)
	}
}

func TestNormalizeInodes(t *testing.T) {
	img := buildImage()
	d := memDisk(img)
	fs, err := Open(d)
	if err != nil {
		t.Fatal(err)
	}
	// Only the block holding inodes 9-12 is touched.
	st, err := fs.NormalizeInodes(d, []Extent{{Start: synInodeTable + 2, Len: 1}, {Start: 200, Len: 3}})
	if err != nil {
		t.Fatal(err)
	}
	if st.Blocks != 1 || st.InUse != 3 || st.Cleared != 1 || st.Written != 1 {
		t.Errorf("stats %+v, want 1 block, 3 in use, 1 cleared, 1 written", st)
	}
	f := synInode(img, 11)
	for _, c := range []struct {
		name string
		off  int
		want uint32
	}{
		{"ctime", iCtime, 1000}, {"ctime_extra", iCtimeExtra, 88}, {"crtime", iCrtime, 1000},
		{"crtime_extra", iCrtimeXtra, 88}, {"generation", iGeneration, 0}, {"version", iVersionLo, 0},
		{"version_hi", iVersionHi, 0}, {"mtime", iMtime, 1000},
	} {
		if got := le.Uint32(f[c.off:]); got != c.want {
			t.Errorf("inode 11 %s = %d, want %d", c.name, got, c.want)
		}
	}
	if !isZero(synInode(img, 12)) {
		t.Error("freed inode 12 was not zeroed")
	}
	if got := le.Uint32(synInode(img, 2)[iGeneration:]); got != 0xDEADBEEF {
		t.Errorf("root inode in an untouched block changed: generation %#x", got)
	}
	again, err := fs.NormalizeInodes(d, []Extent{{Start: synInodeTable + 2, Len: 1}})
	if err != nil || again.Written != 0 {
		t.Errorf("second pass: %+v, %v; want nothing written", again, err)
	}
}

func TestRestoreMountFields(t *testing.T) {
	img := buildImage()
	d := memDisk(img)
	before, err := ReadSuperblock(d)
	if err != nil {
		t.Fatal(err)
	}
	sb := img[SuperblockOffset:]
	le.PutUint32(sb[0x2C:], 1800000000)
	le.PutUint16(sb[0x34:], 4)
	copy(sb[0x88:], "/tmp/mnt-123")
	le.PutUint64(sb[0x178:], 99999)
	le.PutUint32(sb[0x10:], 77) // free inodes: a real change, kept
	if err := RestoreMountFields(d, before); err != nil {
		t.Fatal(err)
	}
	after, _ := ReadSuperblock(d)
	want := before.Raw()
	le.PutUint32(want[0x10:], 77)
	if after.Raw() != want {
		t.Error("superblock after restore differs from the one before but for the free inode count")
	}
	le.PutUint16(sb[0x3A:], 1|stateErrors)
	if err := RestoreMountFields(d, before); !errors.Is(err, ErrCorrupt) {
		t.Errorf("filesystem with errors: %v, want ErrCorrupt", err)
	}
}

// badImages are corruptions each of which Open or JournalExtents rejects.
func badImages() map[string]func([]byte) {
	sb := func(off int, v uint32) func([]byte) {
		return func(b []byte) { le.PutUint32(b[SuperblockOffset+off:], v) }
	}
	ext := func(off int, v uint16) func([]byte) {
		return func(b []byte) { le.PutUint16(synInode(b, 8)[0x28+off:], v) }
	}
	return map[string]func([]byte){
		"magic":            func(b []byte) { b[SuperblockOffset+0x38] = 0 },
		"block size":       sb(0x18, 20),
		"no inodes":        sb(0x28, 0),
		"huge groups":      sb(0x20, 8*1024*1024),
		"inode count":      sb(0x0, 17),
		"first data block": sb(0x14, synBlocks),
		"inode table":      func(b []byte) { le.PutUint32(b[2*synBS+8:], synBlocks-1) },
		"journal inum":     sb(0xE0, 99),
		"extent magic":     ext(0, 1),
		"extent entries":   ext(2, 9),
		"extent outside":   func(b []byte) { le.PutUint32(synInode(b, 8)[0x28+12+8:], synBlocks-1) },
		"extent depth":     ext(6, 9),
		"index loop": func(b []byte) { // depth 1 pointing at a block that claims depth 1 too
			e := synInode(b, 8)[0x28:]
			le.PutUint16(e[6:], 1)
			le.PutUint32(e[12+4:], 150)
			blk := b[150*synBS:]
			copy(blk, e[:24])
		},
		"no extents": func(b []byte) { le.PutUint32(synInode(b, 8)[0x20:], 0) },
	}
}

func TestRejectsCorruptImages(t *testing.T) {
	for name, corrupt := range badImages() {
		t.Run(name, func(t *testing.T) {
			img := buildImage()
			corrupt(img)
			fs, err := Open(memDisk(img))
			if err == nil {
				_, err = fs.JournalExtents(memDisk(img))
			}
			if !errors.Is(err, ErrNotExt4) && !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrUnsupported) {
				t.Fatalf("got %v, want an ext4 sentinel error", err)
			}
		})
	}
}

func TestUnsupportedFeatures(t *testing.T) {
	img := buildImage()
	le.PutUint32(img[SuperblockOffset+0x64:], roCompatMetadataCsm)
	fs, err := Open(memDisk(img))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fs.NormalizeInodes(memDisk(img), []Extent{{Start: synInodeTable, Len: 1}}); !errors.Is(err, ErrUnsupported) {
		t.Errorf("metadata_csum: %v, want ErrUnsupported", err)
	}
}

// TestRealFilesystem checks the geometry read from an image mke2fs made
// against what dumpe2fs says.
func TestRealFilesystem(t *testing.T) {
	mkfs, dumpe2fs := testutil.RequireTool(t, "mkfs.ext4"), testutil.RequireTool(t, "dumpe2fs")
	path := filepath.Join(t.TempDir(), "fs.img")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, 512<<20); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(mkfs, "-q", "-F", "-b", "4096", "-O", "^metadata_csum,64bit", "-J", "size=16", path).CombinedOutput()
	if err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	dump, err := exec.Command(dumpe2fs, path).Output()
	if err != nil {
		t.Fatalf("dumpe2fs: %v", err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fs, err := Open(f)
	if err != nil {
		t.Fatal(err)
	}
	tables := regexp.MustCompile(`Inode table at (\d+)-`).FindAllSubmatch(dump, -1)
	if len(tables) != len(fs.Groups) {
		t.Fatalf("%d groups, dumpe2fs lists %d", len(fs.Groups), len(tables))
	}
	for i, m := range tables {
		if want, _ := strconv.ParseUint(string(m[1]), 10, 64); fs.Groups[i].InodeTable != want {
			t.Errorf("group %d inode table at %d, dumpe2fs says %d", i, fs.Groups[i].InodeTable, want)
		}
	}
	ext, err := fs.JournalExtents(f)
	if err != nil {
		t.Fatal(err)
	}
	var total uint64
	for _, e := range ext {
		total += e.Len
	}
	if total != 16<<20/4096 {
		t.Errorf("journal extents %v cover %d blocks, want %d", ext, total, 16<<20/4096)
	}
}

func FuzzOpen(f *testing.F) {
	f.Add(buildImage())
	for _, corrupt := range badImages() {
		img := buildImage()
		corrupt(img)
		f.Add(img)
	}
	f.Fuzz(func(t *testing.T, img []byte) {
		d := memDisk(bytes.Clone(img))
		fs, err := Open(d)
		if err != nil {
			return
		}
		if _, err := fs.JournalExtents(d); err != nil {
			return
		}
		before, _ := ReadSuperblock(d)
		_, _ = fs.NormalizeInodes(d, []Extent{{Start: 0, Len: fs.SB.BlocksCount}})
		_ = RestoreMountFields(d, before)
	})
}
