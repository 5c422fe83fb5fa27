package trace

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"path"
	"strings"
	"unicode"
	"unicode/utf8"
)

// MaxPathList is the largest path list upstream accepts, in bytes.
const MaxPathList = 64 << 10

// Kind is what a trace file holds, as far as its bytes tell.
type Kind int

// Kinds of trace file.
const (
	// KindUnknown is none of the others.
	KindUnknown Kind = iota
	// KindEmpty is a zero-length file: upstream's signal to record a trace into it.
	KindEmpty
	// KindBinary starts with upstream's binary trace magic.
	KindBinary
	// KindProtobuf starts with the bytes every trace.pb starts with.
	KindProtobuf
	// KindPathList looks like upstream's list of absolute paths to prefetch.
	KindPathList
)

func (k Kind) String() string {
	switch k {
	case KindUnknown:
		return "unknown"
	case KindEmpty:
		return "empty"
	case KindBinary:
		return "binary"
	case KindProtobuf:
		return "protobuf"
	case KindPathList:
		return "path list"
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// pbPrefix is how every trace.pb begins: field 1 (format), wire type 2, length, FormatV1.
// Protobuf encoders write known fields in field-number order, so the prefix is stable without
// any framing outside the message.
const pbPrefix = "\x0a" + string(rune(len(FormatV1))) + FormatV1

// Detect tells what data, the content of a trace file, holds. It only sniffs: the binary magic,
// the trace.pb prefix, or text whose first non-blank line is an absolute path. The matching
// reader (ReadBinary, UnmarshalPB, ParsePathList) still decides whether the content is valid.
func Detect(data []byte) Kind {
	switch {
	case len(data) == 0:
		return KindEmpty
	case len(data) >= 4 && binary.LittleEndian.Uint32(data) == BinaryMagic:
		return KindBinary
	case bytes.HasPrefix(data, []byte(pbPrefix)):
		return KindProtobuf
	case looksLikePathList(data):
		return KindPathList
	}
	return KindUnknown
}

func looksLikePathList(data []byte) bool {
	if len(data) > MaxPathList || !utf8.Valid(data) || bytes.IndexByte(data, 0) >= 0 {
		return false
	}
	for line := range strings.Lines(string(data)) {
		if line = strings.TrimSpace(line); line != "" {
			return line[0] == '/'
		}
	}
	return false
}

// ParsePathList parses upstream's path-list trace: UTF-8 text of at most MaxPathList bytes,
// one absolute path per line, a trailing "/" marking a directory (prefetch all beneath it).
// Blank lines and spaces or tabs around a path are ignored; "\r\n" line ends are accepted.
// Paths come back cleaned ("//" collapsed), directories keeping their trailing "/". Where
// upstream silently skips a line it cannot use, this reports it, wrapping ErrPathList.
func ParsePathList(data []byte) ([]string, error) {
	if len(data) > MaxPathList {
		return nil, fmt.Errorf("%w: path list of %d bytes, at most %d", ErrTooLarge, len(data), MaxPathList)
	}
	var paths []string
	lineNo := 0
	for line := range strings.Lines(string(data)) {
		lineNo++
		p := strings.Trim(line, " \t\r\n")
		if p == "" {
			continue
		}
		clean, err := cleanListPath(p)
		if err != nil {
			return nil, fmt.Errorf("%w: line %d: %v", ErrPathList, lineNo, err)
		}
		paths = append(paths, clean)
	}
	return paths, nil
}

// cleanListPath checks and cleans one path of a path list.
func cleanListPath(p string) (string, error) {
	quoted := p
	if len(quoted) > 80 {
		quoted = quoted[:80] + "..."
	}
	if !utf8.ValidString(p) {
		return "", fmt.Errorf("%q is not valid UTF-8", quoted)
	}
	if strings.IndexFunc(p, unicode.IsControl) >= 0 {
		return "", fmt.Errorf("%q contains a control character", quoted)
	}
	if p[0] != '/' {
		return "", fmt.Errorf("%q is not an absolute path", quoted)
	}
	for elem := range strings.SplitSeq(p, "/") {
		if elem == "." || elem == ".." {
			return "", fmt.Errorf("%q has a %q element", quoted, elem)
		}
	}
	clean := path.Clean(p)
	if strings.HasSuffix(p, "/") && clean != "/" {
		clean += "/"
	}
	return clean, nil
}
