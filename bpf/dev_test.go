package bpf_test

import (
	"errors"
	"os"
	"testing"

	"github.com/obdtrace/obdtrace/bpf"
)

func TestParseDev(t *testing.T) {
	for _, c := range []struct {
		in           string
		major, minor uint32
		ok           bool
	}{
		{"7:3", 7, 3, true},
		{"259:0", 259, 0, true},
		{"4095:1048575", 4095, 1048575, true},
		{"4096:0", 0, 0, false},
		{"0:1048576", 0, 0, false},
		{"7", 0, 0, false},
		{"7:", 0, 0, false},
		{":3", 0, 0, false},
		{"7:3:1", 0, 0, false},
		{"-1:3", 0, 0, false},
		{"+7:3", 0, 0, false},
		{"0x7:3", 0, 0, false},
		{"99999999999:1", 0, 0, false},
	} {
		d, err := bpf.ParseDev(c.in)
		if (err == nil) != c.ok {
			t.Errorf("ParseDev(%q) = %v, %v; want ok=%v", c.in, d, err, c.ok)
			continue
		}
		if err != nil {
			if !errors.Is(err, bpf.ErrBadDevice) {
				t.Errorf("ParseDev(%q): %v does not wrap ErrBadDevice", c.in, err)
			}
			continue
		}
		if d.Major() != c.major || d.Minor() != c.minor || d.String() != c.in {
			t.Errorf("ParseDev(%q) = %d:%d (%s)", c.in, d.Major(), d.Minor(), d)
		}
	}
}

func TestLookupDev(t *testing.T) {
	if d, err := bpf.LookupDev("7:3"); err != nil || d.String() != "7:3" {
		t.Errorf("LookupDev(7:3) = %v, %v", d, err)
	}
	if _, err := bpf.LookupDev("/dev/null"); !errors.Is(err, bpf.ErrNotBlockDevice) {
		t.Errorf("LookupDev(/dev/null) = %v, want ErrNotBlockDevice (a character device)", err)
	}
	if _, err := bpf.LookupDev("/nonexistent/dev"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("LookupDev(missing) = %v, want ErrNotExist", err)
	}
	if _, err := os.Stat("/dev/loop0"); err != nil {
		return
	}
	d, err := bpf.LookupDev("loop0")
	if err != nil || d.Major() != 7 || d.Minor() != 0 {
		t.Errorf("LookupDev(loop0) = %v, %v; want 7:0", d, err)
	}
}

func FuzzParseDev(f *testing.F) {
	for _, s := range []string{"7:3", "259:0", "4095:1048575", "4096:0", "", ":", "1:2:3", "08:01", "-0:0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := bpf.ParseDev(s)
		if err != nil {
			if !errors.Is(err, bpf.ErrBadDevice) {
				t.Fatalf("ParseDev(%q): %v does not wrap ErrBadDevice", s, err)
			}
			return
		}
		// What parses must round-trip through its canonical form.
		again, err := bpf.ParseDev(d.String())
		if err != nil || again != d {
			t.Fatalf("ParseDev(%q) = %s, which reparses as %v, %v", s, d, again, err)
		}
	})
}
