package lsmt

import (
	"fmt"

	"github.com/obdtrace/obdtrace/lsmt/zfile"
)

// BlobInfo describes a layer blob for people and tools: what wrappers it has
// and what its headers say.
type BlobInfo struct {
	Size     int64      `json:"size"`
	Wrappers []string   `json:"wrappers"` // outside in, e.g. ["tar", "zfile", "lsmt"]
	Tar      *TarInfo   `json:"tar,omitempty"`
	ZFile    *ZFileInfo `json:"zfile,omitempty"`
	LSMT     LayerInfo  `json:"lsmt"`
}

// TarInfo locates the payload of a tar wrapper.
type TarInfo struct {
	PayloadOffset int64 `json:"payload_offset"`
	PayloadSize   int64 `json:"payload_size"`
}

// ZFileInfo holds the ZFile fields a reader uses.
type ZFileInfo struct {
	HeaderFlags  string `json:"header_flags"`
	TrailerFlags string `json:"trailer_flags,omitempty"`
	Algorithm    string `json:"algorithm"`
	BlockSize    uint32 `json:"block_size"`
	Blocks       int    `json:"blocks"`
	Verify       bool   `json:"verify"`
	OriginalSize int64  `json:"original_size"`
	IndexOffset  uint64 `json:"index_offset"`
}

// LayerInfo holds an LSMT layer's header fields and index statistics.
type LayerInfo struct {
	HeaderFlags    uint32 `json:"header_flags"`
	TrailerFlags   uint32 `json:"trailer_flags"`
	UUID           string `json:"uuid"`
	ParentUUID     string `json:"parent_uuid"`
	Version        string `json:"version"`
	UserTag        string `json:"user_tag,omitempty"`
	VirtualSize    int64  `json:"virtual_size"`
	IndexOffset    uint64 `json:"index_offset"`
	IndexEntries   uint64 `json:"index_entries"` // padding included, as stored
	Segments       int    `json:"segments"`
	ZeroedSegments int    `json:"zeroed_segments"`
	DataBytes      int64  `json:"data_bytes"`
	LayerBytes     int64  `json:"layer_bytes"` // size of the LSMT file itself
}

// Info describes the blob.
func (b *Blob) Info(blobSize int64) BlobInfo {
	info := BlobInfo{Size: blobSize}
	if b.TarWrapped {
		info.Wrappers = append(info.Wrappers, "tar")
		info.Tar = &TarInfo{PayloadOffset: b.PayloadOffset, PayloadSize: b.PayloadSize}
	}
	if z := b.ZFile; z != nil {
		info.Wrappers = append(info.Wrappers, "zfile")
		info.ZFile = zfileInfo(z)
	}
	info.Wrappers = append(info.Wrappers, "lsmt")
	info.LSMT = b.Layer.info()
	return info
}

func zfileInfo(z *zfile.Reader) *ZFileInfo {
	h := z.Header()
	zi := &ZFileInfo{
		HeaderFlags:  h.Flags.String(),
		Algorithm:    z.Algorithm().String(),
		BlockSize:    uint32(z.BlockSize()),
		Blocks:       z.NumBlocks(),
		Verify:       h.Verify,
		OriginalSize: z.Size(),
		IndexOffset:  h.IndexOffset,
	}
	if t, ok := z.Trailer(); ok {
		zi.TrailerFlags = t.Flags.String()
		zi.IndexOffset = t.IndexOffset
	}
	return zi
}

func (l *Layer) info() LayerInfo {
	t := l.trailer
	li := LayerInfo{
		HeaderFlags:  l.header.Flags,
		TrailerFlags: t.Flags,
		UUID:         t.UUID,
		ParentUUID:   t.ParentUUID,
		Version:      fmtVersion(t.Version, t.SubVersion),
		UserTag:      t.UserTag,
		VirtualSize:  l.VirtualSize(),
		IndexOffset:  t.IndexOffset,
		IndexEntries: t.IndexSize,
		Segments:     len(l.index.segs),
		DataBytes:    l.DataSize(),
		LayerBytes:   l.size,
	}
	for _, s := range l.index.segs {
		if s.Zeroed {
			li.ZeroedSegments++
		}
	}
	return li
}

func fmtVersion(v, sub uint8) string { return fmt.Sprintf("%d.%d", v, sub) }
