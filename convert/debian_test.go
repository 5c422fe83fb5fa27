package convert

import (
	"archive/tar"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"testing"
)

// capNetBindService is a security.capability value (VFS_CAP_REVISION_2)
// granting CAP_NET_BIND_SERVICE, effective.
func capNetBindService() string {
	b := make([]byte, 20)
	binary.LittleEndian.PutUint32(b[0:], 0x02000000|1)
	binary.LittleEndian.PutUint32(b[4:], 1<<10)
	return string(b)
}

// debianTopLayer is a layer on the Debian rootfs that deletes, overwrites
// and adds files, with hard links (also to a lower file), symlinks,
// devices, xattrs, an opaque directory, implicit parents and a directory
// big enough to be hashed. variant changes one file's content.
func debianTopLayer(variant int) []tarEntry {
	rng := rand.New(rand.NewPCG(42, 0))
	big := make([]byte, 5<<20+777)
	for i := range big {
		big[i] = byte(rng.Uint32())
	}
	dir := func(name string, mode int64, uid int) tarEntry {
		return tarEntry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, Uid: uid, Gid: uid}}
	}
	file := func(name string, mode int64, data string) tarEntry {
		return tarEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode}, data: []byte(data)}
	}
	e := []tarEntry{
		// Deletions: a file, a whole directory, and an opaque directory.
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "etc/.wh.motd", Mode: 0o644}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "usr/share/doc/.wh.apt", Mode: 0o644}},
		dir("var/cache/apt/", 0o755, 0),
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "var/cache/apt/.wh..wh..opq", Mode: 0o644}},
		file("var/cache/apt/fresh.txt", 0o644, "after the opaque marker\n"),
		// Overwrites: a file, a symlink by a file, a directory by a file.
		file("etc/hostname", 0o644, fmt.Sprintf("converted-%d\n", variant)),
		file("etc/os-release", 0o644, "ID=obdtrace\n"),
		file("srv", 0o600, "srv was a directory\n"),
		// Additions.
		dir("opt/app/", 0o750, 1000),
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "opt/app/bin/tool", Mode: 0o4755, PAXRecords: map[string]string{
			"SCHILY.xattr.user.comment": "a tool",
		}}, data: big},
		// A link header carries its inode's metadata, as tar writers
		// store it; the unpacker applies it again.
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "opt/app/bin/tool-hard", Linkname: "opt/app/bin/tool", Mode: 0o4755}},
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "usr/bin/ls-hard", Linkname: "usr/bin/ls", Mode: 0o755}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "opt/app/bin/ping", Mode: 0o755, PAXRecords: map[string]string{
			"SCHILY.xattr.security.capability": capNetBindService(),
		}}, data: big[:70000]},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "opt/app/current", Linkname: "bin/tool"}},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "opt/app/dangling", Linkname: "/nonexistent"}},
		{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "opt/app/null", Mode: 0o666, Devmajor: 1, Devminor: 3}},
		{hdr: tar.Header{Typeflag: tar.TypeBlock, Name: "opt/app/loop9", Mode: 0o660, Devmajor: 7, Devminor: 9, Gid: 6}},
		{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: "opt/app/fifo", Mode: 0o600}},
		file("opt/app/empty", 0o644, ""),
		dir("home/user/", 0o700, 1000),
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "home/user/.profile", Mode: 0o600, Uid: 1000, Gid: 1000,
			PAXRecords: map[string]string{"SCHILY.xattr.user.origin": "test"}}, data: []byte("PS1='$ '\n")},
	}
	e = append(e, dir("opt/app/many/", 0o755, 0))
	for i := range 3000 {
		e = append(e, file(fmt.Sprintf("opt/app/many/file-%04d", i), 0o644, fmt.Sprintf("file %d\n", i)))
	}
	return e
}

// TestDebian converts a two-layer Debian image and compares the mounted
// result with containerd's unpacking of the same layers, file by file;
// converts it again with a fresh cache and expects the same digests; and
// converts a variant with a changed top layer on the first cache, which
// must reuse the bottom layer.
func TestDebian(t *testing.T) {
	needKernel(t)
	rootfs := debianRootfsTar(t)
	work := t.TempDir()
	top := filepath.Join(work, "top.tar")
	writeTar(t, top, debianTopLayer(1))
	layout := filepath.Join(work, "src")
	writeTestLayout(t, layout, "debian", []testLayer{{rootfs, gzipped}, {top, zstdCompressed}}, nil)
	src := "oci:" + layout + ":debian"

	cache := t.TempDir()
	out := t.TempDir()
	res := convertOK(t, newTestConverter(t, cache, nil), src, "oci:"+out+":debian")
	logThroughput(t, res)

	ref := t.TempDir()
	unpackReference(t, ref, rootfs, top)
	mnt := mountLayout(t, out, resolveLayout(t, out, "debian"))
	want, got := scanTree(t, ref), scanTree(t, mnt, "lost+found")
	compareTrees(t, want, got)
	for _, p := range []string{"etc/motd", "usr/share/doc/apt", "var/cache/apt/archives"} {
		if _, ok := got[p]; ok {
			t.Errorf("%s was whited out but is in the converted image", p)
		}
	}
	for _, p := range []string{"opt/app/bin/tool", "usr/bin/ls-hard", "var/cache/apt/fresh.txt"} {
		if _, ok := got[p]; !ok {
			t.Errorf("%s is missing from the converted image", p)
		}
	}
	if g := got["usr/bin/ls-hard"]; g == nil || g.linkGroup != "usr/bin/ls,usr/bin/ls-hard" {
		t.Errorf("usr/bin/ls-hard is not a hard link of usr/bin/ls: %+v", g)
	}
	if g := got["opt/app/bin/tool"]; g == nil || g.xattrs["user.comment"] != "a tool" || g.mode&0o7777 != 0o4755 || g.nlink != 2 {
		t.Errorf("opt/app/bin/tool lost its xattr, mode or links: %+v", g)
	}
	if g := got["opt/app/bin/ping"]; g == nil || g.xattrs["security.capability"] != capNetBindService() {
		t.Errorf("opt/app/bin/ping lost its capability: %+v", g)
	}
	if len(got) < 9000 {
		t.Errorf("only %d paths in the converted image", len(got))
	}
	t.Logf("compared %d paths; image %s, layers %v", len(want), res.Desc.Digest, layerDigests(res))

	again := convertOK(t, newTestConverter(t, "", nil), src, "oci:"+t.TempDir()+":debian")
	if !slices.Equal(layerDigests(res), layerDigests(again)) || res.Desc.Digest != again.Desc.Digest {
		t.Errorf("converting twice gave different digests:\n%v\n%v", layerDigests(res), layerDigests(again))
	}

	top2 := filepath.Join(work, "top2.tar")
	writeTar(t, top2, debianTopLayer(2))
	layout2 := filepath.Join(work, "src2")
	writeTestLayout(t, layout2, "debian", []testLayer{{rootfs, gzipped}, {top2, zstdCompressed}}, nil)
	v2 := convertOK(t, newTestConverter(t, cache, nil), "oci:"+layout2+":debian", "oci:"+t.TempDir()+":debian")
	l1, l2 := res.Images[0].Layers, v2.Images[0].Layers
	if !l2[1].Cached || l2[1].Desc.Digest != l1[1].Desc.Digest {
		t.Errorf("the unchanged bottom layer was not reused: %+v", l2[1])
	}
	if l2[2].Cached || l2[2].Desc.Digest == l1[2].Desc.Digest {
		t.Errorf("the changed top layer was not rebuilt: %+v", l2[2])
	}
}

func logThroughput(t *testing.T, res *Result) {
	for _, img := range res.Images {
		for i, l := range img.Layers {
			if l.Cached {
				continue
			}
			secs := (l.Apply + l.Commit).Seconds()
			t.Logf("layer %d: %.1f MiB of tar, apply %v, commit %v, %.1f MiB/s; %d blocks stored, %d unchanged",
				i, float64(l.TarBytes)/(1<<20), l.Apply, l.Commit, float64(l.TarBytes)/(1<<20)/secs,
				l.Changes.Data+l.Changes.Zeroed, l.Changes.Unchanged)
		}
	}
}
