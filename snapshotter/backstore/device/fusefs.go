package device

import (
	"errors"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// imageFileName is the one file in the FUSE mount.
const imageFileName = "image"

const (
	rootIno  = fuse.FUSE_ROOT_ID
	imageIno = rootIno + 1
)

// imageFS is a FUSE file system of one directory holding one regular file,
// the image. It speaks the raw protocol: a single fixed file needs no inode
// tree, and each request costs one call into the image.
type imageFS struct {
	fuse.RawFileSystem // ENOSYS for everything not below

	img      Image
	writable WritableImage // nil when read-only
	size     int64
	timeout  time.Duration
	openFlag uint32 // FOPEN_* flags for every open of the image
	mtime    uint64

	// passFile, when set, is the local file that opens pass through to.
	passFile *os.File

	// Requests that reached the daemon, so tests can tell what the kernel
	// served from its cache and which paths writes took.
	reads, writes, discards, syncs atomic.Int64

	mu        sync.Mutex
	server    *fuse.Server
	backingID int32 // registered passthrough backing file, 0 if none
	opens     int   // opens holding backingID
}

func newImageFS(img Image, writable WritableImage, t Tuning) *imageFS {
	fs := &imageFS{
		RawFileSystem: fuse.NewDefaultRawFileSystem(),
		img:           img,
		writable:      writable,
		size:          img.Size(),
		timeout:       t.CacheTimeout,
		mtime:         uint64(time.Now().Unix()),
		// Flush has nothing to do (writes go through at once), and a
		// FLUSH at close would hang a dying server process that still
		// holds the file open: the process's exit closes it and waits
		// for an answer only that process could give.
		openFlag: fuse.FOPEN_NOFLUSH,
	}
	if t.KeepCache {
		fs.openFlag |= fuse.FOPEN_KEEP_CACHE
	}
	if lf, ok := img.(LocalFile); ok && t.Passthrough && writable == nil {
		fs.passFile = lf.File()
	}
	return fs
}

func (fs *imageFS) String() string { return "obdtrace" }

// Init keeps the server for registering passthrough backing files.
func (fs *imageFS) Init(s *fuse.Server) {
	fs.mu.Lock()
	fs.server = s
	fs.mu.Unlock()
}

func (fs *imageFS) attr(ino uint64, a *fuse.Attr) bool {
	*a = fuse.Attr{Ino: ino, Mtime: fs.mtime, Ctime: fs.mtime, Atime: fs.mtime}
	a.Blksize = 4096
	switch ino {
	case rootIno:
		a.Mode = syscall.S_IFDIR | 0o500
		a.Nlink = 2
	case imageIno:
		a.Mode = syscall.S_IFREG | 0o400
		if fs.writable != nil {
			a.Mode |= 0o200
		}
		a.Nlink = 1
		a.Size = uint64(fs.size)
		a.Blocks = (a.Size + 511) / 512
	default:
		return false
	}
	return true
}

func (fs *imageFS) Lookup(_ <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	if h.NodeId != rootIno || name != imageFileName {
		return fuse.ENOENT
	}
	out.NodeId = imageIno
	out.Generation = 1
	fs.attr(imageIno, &out.Attr)
	out.SetEntryTimeout(fs.timeout)
	out.SetAttrTimeout(fs.timeout)
	return fuse.OK
}

func (fs *imageFS) GetAttr(_ <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	if !fs.attr(in.NodeId, &out.Attr) {
		return fuse.ENOENT
	}
	out.SetTimeout(fs.timeout)
	return fuse.OK
}

// SetAttr refuses size changes, since a disk's size is fixed, and ignores
// the rest (times, mode): the file has nothing of its own to keep.
func (fs *imageFS) SetAttr(_ <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	if sz, ok := in.GetSize(); ok && int64(sz) != fs.size {
		return fuse.EPERM
	}
	return fs.GetAttr(nil, &fuse.GetAttrIn{InHeader: in.InHeader}, out)
}

func (fs *imageFS) Access(_ <-chan struct{}, in *fuse.AccessIn) fuse.Status {
	if in.Mask&unix.W_OK != 0 && (in.NodeId != imageIno || fs.writable == nil) {
		return fuse.EACCES
	}
	return fuse.OK
}

func (fs *imageFS) Open(_ <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if in.NodeId != imageIno {
		return fuse.EISDIR
	}
	if in.Flags&syscall.O_ACCMODE != syscall.O_RDONLY && fs.writable == nil {
		return fuse.EROFS
	}
	out.OpenFlags = fs.openFlag
	if id, ok := fs.passthroughID(); ok {
		// The kernel refuses (EIO) a passthrough open that also asks to
		// keep a page cache the file never uses.
		out.OpenFlags = out.OpenFlags&^fuse.FOPEN_KEEP_CACHE | fuse.FOPEN_PASSTHROUGH
		out.BackingID = id
		out.Fh = 1 // marks an open that holds the backing file
	}
	return fuse.OK
}

// passthroughID registers the local file with the kernel on first use. A
// kernel without passthrough refuses; opens then go through the daemon.
func (fs *imageFS) passthroughID() (int32, bool) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if fs.passFile == nil {
		return 0, false
	}
	if fs.backingID == 0 {
		if fs.server == nil {
			return 0, false
		}
		id, errno := fs.server.RegisterBackingFd(&fuse.BackingMap{Fd: int32(fs.passFile.Fd())})
		if errno != 0 || id <= 0 {
			fs.passFile = nil // do not ask again
			return 0, false
		}
		fs.backingID = id
	}
	fs.opens++
	return fs.backingID, true
}

func (fs *imageFS) Release(_ <-chan struct{}, in *fuse.ReleaseIn) {
	if in.Fh != 1 {
		return
	}
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if fs.opens--; fs.opens == 0 && fs.backingID != 0 {
		fs.server.UnregisterBackingFd(fs.backingID)
		fs.backingID = 0
	}
}

func (fs *imageFS) Read(_ <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	fs.reads.Add(1)
	off := int64(in.Offset)
	if off >= fs.size {
		return fuse.ReadResultData(nil), fuse.OK
	}
	n := min(int64(in.Size), int64(len(buf)), fs.size-off)
	got, err := fs.img.ReadAt(buf[:n], off)
	if err != nil && !(errors.Is(err, io.EOF) && int64(got) == n) {
		return nil, fuse.EIO
	}
	return fuse.ReadResultData(buf[:got]), fuse.OK
}

func (fs *imageFS) Write(_ <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	return fs.Writev(nil, in, [][]byte{data})
}

func (fs *imageFS) Writev(_ <-chan struct{}, in *fuse.WriteIn, data [][]byte) (uint32, fuse.Status) {
	if fs.writable == nil {
		return 0, fuse.EROFS
	}
	fs.writes.Add(1)
	p := data[0]
	if len(data) > 1 {
		// The kernel split the payload over buffers; the image wants one
		// aligned write.
		p = make([]byte, 0, in.Size)
		for _, d := range data {
			p = append(p, d...)
		}
	}
	off := int64(in.Offset)
	if off > fs.size-int64(len(p)) {
		return 0, fuse.Status(syscall.ENOSPC)
	}
	n, err := fs.writable.WriteAt(p, off)
	if err != nil {
		return uint32(n), fuse.EIO
	}
	return uint32(n), fuse.OK
}

func (fs *imageFS) Fsync(_ <-chan struct{}, _ *fuse.FsyncIn) fuse.Status {
	if fs.writable == nil {
		return fuse.OK
	}
	fs.syncs.Add(1)
	if err := fs.writable.Sync(); err != nil {
		return fuse.EIO
	}
	return fuse.OK
}

func (fs *imageFS) Flush(_ <-chan struct{}, _ *fuse.FlushIn) fuse.Status { return fuse.OK }

// Fallocate serves the loop driver's discards and write-zeroes, which
// arrive as hole punches and zero-range requests.
func (fs *imageFS) Fallocate(_ <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	if fs.writable == nil {
		return fuse.EROFS
	}
	off, n := int64(in.Offset), int64(in.Length)
	if off < 0 || n < 0 || off > fs.size-n {
		return fuse.Status(syscall.ENOSPC)
	}
	switch in.Mode &^ unix.FALLOC_FL_KEEP_SIZE {
	case 0: // allocation: every byte of the image already exists
		return fuse.OK
	case unix.FALLOC_FL_PUNCH_HOLE, unix.FALLOC_FL_ZERO_RANGE:
		fs.discards.Add(1)
		if err := fs.writable.Discard(off, n); err != nil {
			return fuse.EIO
		}
		return fuse.OK
	}
	return fuse.Status(syscall.EOPNOTSUPP)
}

func (fs *imageFS) OpenDir(_ <-chan struct{}, in *fuse.OpenIn, _ *fuse.OpenOut) fuse.Status {
	if in.NodeId != rootIno {
		return fuse.ENOTDIR
	}
	return fuse.OK
}

func (fs *imageFS) ReadDir(_ <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	entries := []fuse.DirEntry{
		{Name: ".", Ino: rootIno, Mode: syscall.S_IFDIR},
		{Name: "..", Ino: rootIno, Mode: syscall.S_IFDIR},
		{Name: imageFileName, Ino: imageIno, Mode: syscall.S_IFREG},
	}
	for i := int(in.Offset); i < len(entries); i++ {
		entries[i].Off = uint64(i + 1)
		if !out.AddDirEntry(entries[i]) {
			break
		}
	}
	return fuse.OK
}

func (fs *imageFS) StatFs(_ <-chan struct{}, _ *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	*out = fuse.StatfsOut{Blocks: uint64(fs.size) / 4096, Files: 2, Bsize: 4096, Frsize: 4096, NameLen: 255}
	return fuse.OK
}
