package wanproxy

import (
	"errors"
	"strings"
	"testing"
)

func TestParseRate(t *testing.T) {
	good := map[string]int64{
		"25mbit":      3125000,
		"25Mbit":      3125000,
		"100kbit":     12500,
		"1gbit":       125000000,
		"8bit":        1,
		"1mibit":      131072,
		"3MB":         3000000,
		"3MiB":        3 << 20,
		"512KB":       512000,
		"512kB":       512000,
		"4KiB":        4096,
		"1GB":         1000000000,
		"1GiB":        1 << 30,
		"100B":        100,
		"2.5mbit":     312500,
		" 25mbit/s ":  3125000,
		"25 mbit":     3125000,
		"0":           0,
		"0mbit":       0,
		"unlimited":   0,
		"Unlimited/s": 0,
	}
	for in, want := range good {
		got, err := ParseRate(in)
		if err != nil || got != want {
			t.Errorf("ParseRate(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	bad := map[string]string{
		"":         "want a number",
		"mbit":     "want a number",
		"25":       "missing unit",
		"25mbps":   "ambiguous",
		"25Mbps":   "ambiguous",
		"25Mb":     "ambiguous",
		"25mb":     "ambiguous",
		"25b":      "ambiguous",
		"25 furl":  "unknown",
		"-5mbit":   "want a number",
		"1e3mbit":  "unknown",
		"1.2.3MB":  "malformed",
		"1bit":     "below 1 byte/s",
		"2TB":      "unknown",
		"99999GiB": "above the maximum",
		"0xff":     "unknown",
		"0furl":    "unknown",
	}
	for in, msg := range bad {
		_, err := ParseRate(in)
		if !errors.Is(err, ErrBadRate) || !strings.Contains(err.Error(), msg) {
			t.Errorf("ParseRate(%q) error %v; want ErrBadRate saying %q", in, err, msg)
		}
	}
}

func TestFormatRate(t *testing.T) {
	cases := map[int64]string{
		0:       "unlimited",
		-1:      "unlimited",
		3125000: "25mbit",
		12500:   "100kbit",
		1 << 20: "1048576B", // 8388608 bits: not whole kbit
		3:       "3B",
		1 << 41: "2199023255552B", // above MaxRate: no bit arithmetic
	}
	for bps, want := range cases {
		if got := FormatRate(bps); got != want {
			t.Errorf("FormatRate(%d) = %q, want %q", bps, got, want)
		}
	}
}

// FuzzParseRate checks that no input panics or yields a rate outside
// [0, MaxRate], and that FormatRate reads back to the same rate.
func FuzzParseRate(f *testing.F) {
	for _, s := range []string{"25mbit", "3MB", "100kbit", "2.5MiB/s", "0", "unlimited", "25", "25mbps", ".", "1.5e3kbit", "99999999999999999999GB"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		bps, err := ParseRate(s)
		if err != nil {
			if !errors.Is(err, ErrBadRate) {
				t.Fatalf("ParseRate(%q): error %v does not wrap ErrBadRate", s, err)
			}
			return
		}
		if bps < 0 || bps > MaxRate {
			t.Fatalf("ParseRate(%q) = %d, outside [0, MaxRate]", s, bps)
		}
		back, err := ParseRate(FormatRate(bps))
		if err != nil || back != bps {
			t.Fatalf("ParseRate(FormatRate(%d) = %q) = %d, %v", bps, FormatRate(bps), back, err)
		}
	})
}
