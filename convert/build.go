package convert

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdtrace/obdtrace/convert/ext4"
	"github.com/obdtrace/obdtrace/internal/iox"
	"github.com/obdtrace/obdtrace/lsmt"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/device"
)

// layerSource is one source layer to convert.
type layerSource struct {
	index   int
	count   int // layers in the image
	desc    ocispec.Descriptor
	diffID  digest.Digest
	chainID digest.Digest
	parent  digest.Digest // chain id of the layer below; "" for the bottom one
	mkfs    bool          // format the filesystem in this layer
	open    func(ctx context.Context) (io.ReadCloser, error)
}

// builtLayer is a layer applied and normalised, waiting to be committed:
// disk is the filesystem after it, base the one before.
type builtLayer struct {
	src        layerSource
	disk       *lsmt.WritableStack
	view       io.ReaderAt // disk, with the journal as it was before the mount
	base       io.ReaderAt
	candidates []lsmt.Segment
	writables  []*lsmt.Writable
	dir        string
	tarBytes   int64
	applied    time.Duration
}

// close releases the layer's writable files and work directory.
func (b *builtLayer) close() {
	for _, w := range b.writables {
		w.Close()
	}
	os.RemoveAll(b.dir)
}

// buildLayer applies one source layer onto lower (nil for an empty disk,
// when src.mkfs formats one) and normalises the result.
func (c *Converter) buildLayer(ctx context.Context, work string, src layerSource, lower io.ReaderAt) (_ *builtLayer, err error) {
	dir := filepath.Join(work, fmt.Sprintf("layer-%03d", src.index))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("convert: %w", err)
	}
	b := &builtLayer{src: src, base: lower, dir: dir}
	defer func() {
		if err != nil {
			b.close()
		}
	}()
	uuid, err := chainUUID(src.chainID)
	if err != nil {
		return nil, err
	}
	pre := lower
	if src.mkfs {
		if pre, err = c.format(ctx, b, uuid); err != nil {
			return nil, err
		}
	}
	if pre == nil {
		return nil, fmt.Errorf("%w: layer %d has no filesystem below it", ErrNoFilesystem, src.index)
	}
	before, err := ext4.Open(pre)
	if err != nil {
		return nil, fmt.Errorf("convert: filesystem below layer %d: %w", src.index, err)
	}
	if err := before.SB.CheckNormalizable(); err != nil {
		return nil, fmt.Errorf("convert: filesystem below layer %d: %w", src.index, err)
	}
	journal, err := before.JournalExtents(pre)
	if err != nil {
		return nil, fmt.Errorf("convert: filesystem below layer %d: %w", src.index, err)
	}
	w, err := c.newWritable(dir, "apply", uuid)
	if err != nil {
		return nil, err
	}
	b.writables = append(b.writables, w)
	b.disk = lsmt.NewWritableStack(pre, w)
	start := time.Now()
	if err := c.applyOnDevice(ctx, b); err != nil {
		return nil, err
	}
	b.applied = time.Since(start)
	if err := normalize(b.disk, before.SB); err != nil {
		return nil, fmt.Errorf("convert: normalise layer %d: %w", src.index, err)
	}
	b.view = &journalView{disk: b.disk, pre: pre, ranges: byteRanges(journal, before.SB.BlockSize)}
	for _, w := range b.writables {
		b.candidates = append(b.candidates, w.Index()...)
	}
	return b, nil
}

// applyOnDevice attaches the layer's disk and applies the tar to it,
// making sure nothing stays mounted when the child fails.
func (c *Converter) applyOnDevice(ctx context.Context, b *builtLayer) error {
	return c.withDevice(ctx, b.disk, b.dir, func(dev string) error {
		mnt := filepath.Join(b.dir, "mnt")
		if err := os.MkdirAll(mnt, 0o755); err != nil {
			return fmt.Errorf("convert: %w", err)
		}
		err := c.applyTar(ctx, b, dev, mnt)
		if isMounted(mnt) { // the child died before it could unmount
			if uerr := runInChild(context.WithoutCancel(ctx), childUnmount, nil, mnt); err == nil {
				err = uerr
			}
		}
		return err
	})
}

func (c *Converter) newWritable(dir, name, uuid string) (*lsmt.Writable, error) {
	w, err := lsmt.CreateWritable(filepath.Join(dir, name+".data"), filepath.Join(dir, name+".index"),
		lsmt.WritableOptions{VirtualSize: c.opts.VirtualSize, UUID: uuid})
	if err != nil {
		return nil, fmt.Errorf("convert: %w", err)
	}
	return w, nil
}

// mke2fsConf pins every mke2fs default a formatted layer depends on, so
// the host's /etc/mke2fs.conf does not change the bytes. The features are
// the baselayer's.
const mke2fsConf = `[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384
	reserved_ratio = 5.0
	lazy_itable_init = 1
	lazy_journal_init = 1

[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,uninit_bg,64bit,dir_nlink,extra_isize
	}
`

// format makes the empty filesystem of an image converted without the
// baselayer, in a writable layer of its own under the one the tar is
// applied to, so that the journal's state after mkfs is known. mke2fs is
// deterministic given its configuration, the UUID and hash seed (both
// derived from the layer's chain id) and a fixed clock.
func (c *Converter) format(ctx context.Context, b *builtLayer, uuid string) (*lsmt.WritableStack, error) {
	w, err := c.newWritable(b.dir, "mkfs", uuid)
	if err != nil {
		return nil, err
	}
	b.writables = append(b.writables, w)
	disk := lsmt.NewWritableStack(nil, w)
	conf := filepath.Join(b.dir, "mke2fs.conf")
	if err := os.WriteFile(conf, []byte(mke2fsConf), 0o644); err != nil {
		return nil, fmt.Errorf("convert: %w", err)
	}
	seed := digest.FromString("hash seed " + b.src.chainID.String()).Encoded()
	hashSeed := fmt.Sprintf("%s-%s-%s-%s-%s", seed[0:8], seed[8:12], seed[12:16], seed[16:20], seed[20:32])
	err = c.withDevice(ctx, disk, b.dir, func(dev string) error {
		cmd := exec.CommandContext(ctx, "mkfs.ext4", "-F", "-q", "-t", "ext4", "-U", uuid,
			"-E", "hash_seed="+hashSeed+",nodiscard", dev)
		cmd.Env = append(os.Environ(), "MKE2FS_CONFIG="+conf, "E2FSPROGS_FAKE_TIME=1")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("convert: mkfs.ext4: %w: %s", err, out)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return disk, nil
}

// withDevice attaches disk as a writable block device for fn, and detaches
// it afterwards, also when fn fails.
func (c *Converter) withDevice(ctx context.Context, disk *lsmt.WritableStack, dir string, fn func(dev string) error) (err error) {
	d, err := c.opts.Frontend.Attach(ctx, disk, device.Options{
		Writable: true, MountDir: filepath.Join(dir, "fuse"), Logger: c.log,
	})
	if err != nil {
		return fmt.Errorf("convert: attach device: %w", err)
	}
	defer func() {
		if cerr := d.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("convert: detach device: %w", cerr)
		}
	}()
	return fn(d.Path())
}

// applyTar applies the layer's tar to the ext4 filesystem on dev in a
// child process (mounting it at mnt), decompressing it here, in another
// goroutine, and verifying the blob's digest and the tar's diff_id.
func (c *Converter) applyTar(ctx context.Context, b *builtLayer, dev, mnt string) error {
	blob, err := b.src.open(ctx)
	if err != nil {
		return err
	}
	lr, err := newLayerReader(blob, b.src.desc, b.src.diffID)
	if err != nil {
		blob.Close()
		return err
	}
	label := fmt.Sprintf("layer %d/%d %s", b.src.index+1, b.src.count, shortDigest(b.src.desc.Digest))
	prog := startProgress(c.opts.Progress, label, b.src.desc.Size, lr.CompressedRead)
	pr, pw := io.Pipe()
	copied := make(chan error, 1)
	go func() {
		_, err := io.Copy(pw, lr)
		pw.CloseWithError(err)
		copied <- err
	}()
	childErr := runInChild(ctx, childApply, pr, dev, mnt)
	pr.CloseWithError(errChildStdin) // the child may have stopped reading early
	copyErr := <-copied
	closeErr := lr.Close()
	b.tarBytes = lr.tarSize
	// The reader's errors name what is wrong with the layer; the child's
	// follow from them when both failed.
	if errors.Is(copyErr, errChildStdin) {
		copyErr = nil
	}
	if err := cmp.Or(copyErr, closeErr, childErr); err != nil {
		prog.finish("failed")
		return err
	}
	prog.finish("applied")
	return nil
}

// normalize makes the filesystem on disk independent of when and on which
// CPU the kernel wrote it: the superblock's mount bookkeeping goes back to
// what it was before, and the inodes in the inode table blocks the layer
// wrote are normalised.
func normalize(disk *lsmt.WritableStack, before *ext4.Superblock) error {
	if err := ext4.RestoreMountFields(disk, before); err != nil {
		return err
	}
	fs, err := ext4.Open(disk)
	if err != nil {
		return err
	}
	perBlock := uint64(fs.SB.BlockSize / lsmt.SectorSize)
	var touched []ext4.Extent
	for _, s := range disk.Upper().Index() {
		first, end := s.Offset/perBlock, (s.End()+perBlock-1)/perBlock
		touched = append(touched, ext4.Extent{Start: first, Len: end - first})
	}
	_, err = fs.NormalizeInodes(disk, touched)
	return err
}

// byteRange is [off, end) on a disk.
type byteRange struct{ off, end int64 }

func byteRanges(ext []ext4.Extent, blockSize int64) []byteRange {
	out := make([]byteRange, len(ext))
	for i, e := range ext {
		out[i] = byteRange{int64(e.Start) * blockSize, int64(e.Start+e.Len) * blockSize}
	}
	return out
}

// journalView reads disk, except that the journal reads as it was before
// the mount (from pre). Once the filesystem is cleanly unmounted the
// journal's content is dead: what jbd2 wrote there (transaction sequence
// numbers, commit timestamps) depends on timing, so the committed layer
// keeps the journal as it found it.
type journalView struct {
	disk, pre io.ReaderAt
	ranges    []byteRange // sorted, disjoint
}

func (v *journalView) ReadAt(p []byte, off int64) (int, error) {
	n, err := v.disk.ReadAt(p, off)
	end := off + int64(n)
	for _, r := range v.ranges {
		lo, hi := max(r.off, off), min(r.end, end)
		if lo >= hi {
			continue
		}
		if err := iox.ReadAtOrZeros(v.pre, p[lo-off:hi-off], lo); err != nil {
			return int(lo - off), err
		}
	}
	return n, err
}

func shortDigest(d digest.Digest) string {
	if e := d.Encoded(); len(e) > 12 {
		return d.Algorithm().String() + ":" + e[:12]
	}
	return d.String()
}
