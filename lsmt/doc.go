// Package lsmt reads and writes overlaybd's LSMT layers and stacks them into
// the virtual disk an image presents.
//
// An LSMT layer maps sectors of a virtual disk (64 GiB for converted images)
// to sectors of the layer's own byte space through a sorted index of
// [Segment]s. A committed layer is a single read-only blob: a 4 KiB header,
// the data, the index and a 4 KiB trailer. A [Writable] layer appends data and
// index entries to two files and is turned into a committed layer by
// [Writable.Commit]. A [Stack] merges layers, bottom first, into one view whose
// [Stack.Map] says which layer serves each byte of a range.
//
// Layer numbering in this package is bottom first (0 = the image's bottom
// layer), the numbering traces use. Upstream's merged index tags layers top
// first; that numbering never appears here.
//
// The compressed (ZFile) and tar wrappers that usually surround a layer blob
// live in the zfile and tarwrap subpackages; [OpenBlob] peels them off.
//
// Byte-level facts: docs/formats.md in this repository.
package lsmt
