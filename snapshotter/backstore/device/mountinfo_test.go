package device

import (
	"errors"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

const sampleMountInfo = `22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
36 22 0:40 / /tmp/obd\040dev/fuse rw,nosuid,nodev,relatime shared:90 master:3 - fuse.obdtrace obdtrace rw,user_id=0,group_id=0,max_read=1048576
37 22 7:3 / /mnt/a\134b rw - ext4 /dev/loop3 ro
`

func TestParseMountInfo(t *testing.T) {
	got, err := parseMountInfo(strings.NewReader(sampleMountInfo))
	if err != nil {
		t.Fatal(err)
	}
	want := []mountEntry{
		{mountPoint: "/", dev: unix.Mkdev(254, 0), fsType: "ext4"},
		{mountPoint: "/tmp/obd dev/fuse", dev: unix.Mkdev(0, 40), fsType: "fuse.obdtrace"},
		{mountPoint: `/mnt/a\b`, dev: unix.Mkdev(7, 3), fsType: "ext4"},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d entries, want %d: %+v", len(got), len(want), got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("entry %d: %+v, want %+v", i, got[i], want[i])
		}
	}
}

func TestParseMountInfoErrors(t *testing.T) {
	for _, line := range []string{
		"22 1 254:0 / / rw",                            // no separator
		"22 1 254:0 / / rw shared:1 -",                 // nothing after the separator
		"22 1 2540 / / rw - ext4 /dev/vda rw",          // device without colon
		"22 1 x:0 / / rw - ext4 /dev/vda rw",           // bad major
		"22 1 1:99999999999 / / rw - ext4 /dev/vda rw", // minor too big
		`22 1 1:2 / /a\04 rw - ext4 /dev/vda rw`,       // truncated escape
		`22 1 1:2 / /a\9zz rw - ext4 /dev/vda rw`,      // bad escape
		"-",
	} {
		if _, err := parseMountInfo(strings.NewReader(line + "\n")); !errors.Is(err, ErrMountInfo) {
			t.Errorf("%q: %v, want ErrMountInfo", line, err)
		}
	}
	long := "1 2 3:4 / /" + strings.Repeat("a", maxMountInfoLine) + " rw - ext4 x rw\n"
	if _, err := parseMountInfo(strings.NewReader(long)); !errors.Is(err, ErrMountInfo) {
		t.Errorf("over-long line: %v, want ErrMountInfo", err)
	}
}

// TestParseOwnMountInfo parses this machine's table, which has at least
// the root mount.
func TestParseOwnMountInfo(t *testing.T) {
	f, err := os.Open(mountInfoPath)
	if err != nil {
		t.Skipf("no %s: %v", mountInfoPath, err)
	}
	defer f.Close()
	got, err := parseMountInfo(f)
	if err != nil {
		t.Fatal(err)
	}
	root := false
	for _, m := range got {
		root = root || m.mountPoint == "/"
	}
	if !root {
		t.Errorf("no root mount among %d entries", len(got))
	}
}

func FuzzParseMountInfo(f *testing.F) {
	for _, l := range strings.Split(sampleMountInfo, "\n") {
		f.Add(l)
	}
	f.Add(`1 2 3:4 / /x\040y\011z\012\134 rw a:1 b:2 - fuse.x src rw`)
	f.Add("1 2 3:4 / / rw - -")
	f.Add(`1 2 3:4 / \ rw - t s o`)
	f.Fuzz(func(t *testing.T, s string) {
		entries, err := parseMountInfo(strings.NewReader(s))
		if err != nil {
			if !errors.Is(err, ErrMountInfo) {
				t.Fatalf("error %v does not wrap ErrMountInfo", err)
			}
			return
		}
		for _, e := range entries {
			if e.fsType == "" {
				t.Fatalf("entry without a type from %q", s)
			}
		}
	})
}
