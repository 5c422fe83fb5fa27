package bpf

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// The kernel's internal dev_t packs the minor number into the low 20 bits
// (MINORBITS); user-space dev_t (stat's st_rdev) uses a different layout, so
// conversions always go through major and minor.
const (
	minorBits = 20
	maxMajor  = 1<<(32-minorBits) - 1
	maxMinor  = 1<<minorBits - 1
)

var (
	// ErrBadDevice reports a device number that cannot be parsed or encoded.
	ErrBadDevice = errors.New("bpf: bad device number")
	// ErrNotBlockDevice reports a device path that is not a block device.
	ErrNotBlockDevice = errors.New("bpf: not a block device")
)

// Dev is a block device number in the kernel's internal encoding
// (major<<20 | minor), the form the block tracepoints report and the
// program's device set is keyed by.
type Dev uint32

// MakeDev encodes major and minor, failing if either is out of the kernel's
// range (12 bits of major, 20 of minor).
func MakeDev(major, minor uint32) (Dev, error) {
	if major > maxMajor || minor > maxMinor {
		return 0, fmt.Errorf("%w: %d:%d out of range (major <= %d, minor <= %d)",
			ErrBadDevice, major, minor, maxMajor, maxMinor)
	}
	return Dev(major<<minorBits | minor), nil
}

// Major returns the device's major number.
func (d Dev) Major() uint32 { return uint32(d) >> minorBits }

// Minor returns the device's minor number.
func (d Dev) Minor() uint32 { return uint32(d) & maxMinor }

// String formats d as "major:minor".
func (d Dev) String() string { return string(d.appendText(nil)) }

// AppendText implements encoding.TextAppender: "major:minor", without
// allocating. It never fails.
func (d Dev) AppendText(b []byte) ([]byte, error) { return d.appendText(b), nil }

func (d Dev) appendText(b []byte) []byte {
	b = strconv.AppendUint(b, uint64(d.Major()), 10)
	b = append(b, ':')
	return strconv.AppendUint(b, uint64(d.Minor()), 10)
}

// MarshalText implements encoding.TextMarshaler ("major:minor").
func (d Dev) MarshalText() ([]byte, error) { return d.appendText(nil), nil }

// UnmarshalText implements encoding.TextUnmarshaler (see ParseDev).
func (d *Dev) UnmarshalText(b []byte) error {
	v, err := ParseDev(string(b))
	if err != nil {
		return err
	}
	*d = v
	return nil
}

// ParseDev parses "major:minor" in decimal.
func ParseDev(s string) (Dev, error) {
	maj, min, ok := strings.Cut(s, ":")
	if !ok {
		return 0, fmt.Errorf("%w: %q is not major:minor", ErrBadDevice, s)
	}
	major, err := strconv.ParseUint(maj, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("%w: major in %q: %v", ErrBadDevice, s, err)
	}
	minor, err := strconv.ParseUint(min, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("%w: minor in %q: %v", ErrBadDevice, s, err)
	}
	return MakeDev(uint32(major), uint32(minor))
}

// DevOf returns the device number of the block device special file at path
// (following symlinks, so /dev/disk/by-id names work).
func DevOf(path string) (Dev, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("bpf: device: %w", &os.PathError{Op: "stat", Path: path, Err: err})
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return 0, fmt.Errorf("%w: %s is a %s", ErrNotBlockDevice, path, fileType(st.Mode))
	}
	return MakeDev(unix.Major(st.Rdev), unix.Minor(st.Rdev))
}

func fileType(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFCHR:
		return "character device"
	case unix.S_IFREG:
		return "regular file"
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFIFO:
		return "pipe"
	case unix.S_IFSOCK:
		return "socket"
	}
	return fmt.Sprintf("file of type %#o", mode&unix.S_IFMT)
}

// LookupDev accepts what a user would type for a device: a block device path
// such as /dev/loop3, or "major:minor".
func LookupDev(s string) (Dev, error) {
	if strings.ContainsRune(s, '/') {
		return DevOf(s)
	}
	if strings.ContainsRune(s, ':') {
		return ParseDev(s)
	}
	// A bare name like "loop3" is most likely meant under /dev.
	return DevOf("/dev/" + s)
}
