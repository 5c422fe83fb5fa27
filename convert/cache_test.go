package convert

import (
	"archive/tar"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// smallLayers writes three small layer tars: files, then changes to them.
func smallLayers(t *testing.T, dir string) []string {
	t.Helper()
	var paths []string
	for i, entries := range [][]tarEntry{
		{
			{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "data/", Mode: 0o755}},
			{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "data/a", Mode: 0o644}, data: []byte("a0")},
			{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "data/b", Mode: 0o644}, data: make([]byte, 300000)},
		},
		{
			{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "data/.wh.b"}},
			{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "data/c", Mode: 0o600, Uid: 7}, data: []byte("c1")},
		},
		{
			{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "data/a", Mode: 0o644}, data: []byte("a2")},
			{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "data/link", Linkname: "c"}},
		},
	} {
		p := filepath.Join(dir, fmt.Sprintf("layer%d.tar", i))
		writeTar(t, p, entries)
		paths = append(paths, p)
	}
	return paths
}

// TestCacheHoles converts a three-layer image, drops the bottom and top
// layers from the cache and converts again: the bottom layer is rebuilt,
// the middle one (built on the rebuilt one's uncommitted disk the first
// time, on its blob now) is reused, the top one is rebuilt on it, and
// every digest comes out the same.
func TestCacheHoles(t *testing.T) {
	needKernel(t)
	dir := t.TempDir()
	tars := smallLayers(t, dir)
	layout := filepath.Join(dir, "src")
	writeTestLayout(t, layout, "img", []testLayer{{tars[0], gzipped}, {tars[1], uncompressed}, {tars[2], zstdCompressed}}, nil)
	src := "oci:" + layout + ":img"
	cache := t.TempDir()
	c := newTestConverter(t, cache, nil)
	first := convertOK(t, c, src, "oci:"+t.TempDir()+":img")
	layers := first.Images[0].Layers // baselayer first
	for _, i := range []int{1, 3} {
		if err := os.RemoveAll(c.cache.entry(cacheKey(layers[i].ChainID, c.baseKey))); err != nil {
			t.Fatal(err)
		}
	}
	out := t.TempDir()
	second := convertOK(t, newTestConverter(t, cache, nil), src, "oci:"+out+":img")
	got := second.Images[0].Layers
	if got[1].Cached || !got[2].Cached || got[3].Cached {
		t.Errorf("cached: %v %v %v, want false true false", got[1].Cached, got[2].Cached, got[3].Cached)
	}
	if !slices.Equal(layerDigests(first), layerDigests(second)) {
		t.Errorf("digests differ:\n%v\n%v", layerDigests(first), layerDigests(second))
	}
	ref := t.TempDir()
	unpackReference(t, ref, tars...)
	mnt := mountLayout(t, out, resolveLayout(t, out, "img"))
	compareTrees(t, scanTree(t, ref), scanTree(t, mnt, "lost+found"))
}
