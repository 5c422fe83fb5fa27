package device

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrMountInfo is returned for a mountinfo line that cannot be parsed.
var ErrMountInfo = errors.New("device: malformed mountinfo")

// maxMountInfoLine bounds one line of /proc/<pid>/mountinfo; the kernel's
// own lines are far shorter.
const maxMountInfoLine = 1 << 20

// mountEntry is what Cleanup needs of a mountinfo line.
type mountEntry struct {
	mountPoint string
	dev        uint64 // st_dev of files on the mount
	fsType     string
}

// parseMountInfo reads the format of /proc/<pid>/mountinfo (proc(5)):
//
//	36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw
func parseMountInfo(r io.Reader) ([]mountEntry, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), maxMountInfoLine)
	var out []mountEntry
	for line := 1; sc.Scan(); line++ {
		e, err := parseMountInfoLine(sc.Text())
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		out = append(out, e)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrMountInfo, err)
	}
	return out, nil
}

func parseMountInfoLine(s string) (mountEntry, error) {
	fields := strings.Fields(s)
	sep := -1
	for i := 6; i < len(fields); i++ {
		if fields[i] == "-" {
			sep = i
			break
		}
	}
	if len(fields) < 7 || sep < 0 || sep+1 >= len(fields) {
		return mountEntry{}, fmt.Errorf("%w: %d fields and no \" - \" separator before the type in %.80q", ErrMountInfo, len(fields), s)
	}
	majStr, minStr, ok := strings.Cut(fields[2], ":")
	maj, err1 := strconv.ParseUint(majStr, 10, 32)
	minor, err2 := strconv.ParseUint(minStr, 10, 32)
	if !ok || err1 != nil || err2 != nil {
		return mountEntry{}, fmt.Errorf("%w: device %q is not major:minor", ErrMountInfo, fields[2])
	}
	mp, err := unescapeOctal(fields[4])
	if err != nil {
		return mountEntry{}, err
	}
	return mountEntry{mountPoint: mp, dev: unix.Mkdev(uint32(maj), uint32(minor)), fsType: fields[sep+1]}, nil
}

// unescapeOctal undoes the kernel's \ooo escaping of space, tab, newline
// and backslash in paths.
func unescapeOctal(s string) (string, error) {
	if !strings.Contains(s, `\`) {
		return s, nil
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '\\' {
			b.WriteByte(s[i])
			continue
		}
		if i+4 > len(s) {
			return "", fmt.Errorf("%w: truncated escape in %q", ErrMountInfo, s)
		}
		v, err := strconv.ParseUint(s[i+1:i+4], 8, 8)
		if err != nil {
			return "", fmt.Errorf("%w: bad escape %q in %q", ErrMountInfo, s[i:i+4], s)
		}
		b.WriteByte(byte(v))
		i += 3
	}
	return b.String(), nil
}
