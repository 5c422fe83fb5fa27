package wanproxy

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// ErrBadRate is wrapped by ParseRate's errors.
var ErrBadRate = errors.New("wanproxy: bad rate")

// MaxRate is the largest rate ParseRate accepts, in bytes per second
// (about 8.8 Tbit/s): far above any link worth emulating, and small enough
// that arithmetic on it cannot overflow.
const MaxRate = 1 << 40

// Units are decimal (SI) unless they carry an "i"; "bit" units count bits and
// "B" units bytes. The lower-case "b" alone and "bps" spellings are refused:
// tc reads "mbps" as megabytes, most people as megabits.
var (
	bitUnits = map[string]float64{ // keys lower-cased; the value is bytes per unit
		"bit": 1.0 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
		"kibit": 1024.0 / 8, "mibit": (1 << 20) / 8.0, "gibit": (1 << 30) / 8.0,
	}
	byteUnits = map[string]float64{ // case-sensitive
		"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9,
		"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
	}
)

// ParseRate parses a link rate into bytes per second. Bits: "100kbit",
// "25mbit", "1gbit" (case-insensitive, ×1000; "mibit" etc. for ×1024).
// Bytes: "512KB", "3MB", "3MiB", "1GB" ("B" upper-case). An optional "/s"
// may follow. "0" (any unit or none) and "unlimited" return 0, no cap.
func ParseRate(s string) (int64, error) {
	in := s
	s = strings.TrimSpace(s)
	s = strings.TrimSuffix(s, "/s")
	if strings.EqualFold(s, "unlimited") {
		return 0, nil
	}
	i := 0
	for i < len(s) && (s[i] >= '0' && s[i] <= '9' || s[i] == '.') {
		i++
	}
	num, unit := s[:i], strings.TrimSpace(s[i:])
	if num == "" {
		return 0, fmt.Errorf("%w %q: want a number and a unit, e.g. 25mbit or 3MB", ErrBadRate, in)
	}
	// Only digits and dots reach ParseFloat, so no sign, exponent, Inf or NaN.
	v, err := strconv.ParseFloat(num, 64)
	if err != nil {
		return 0, fmt.Errorf("%w %q: number %q is malformed", ErrBadRate, in, num)
	}
	if v == 0 && (unit == "" || unitFactor(unit) > 0) {
		return 0, nil
	}
	if unit == "" {
		return 0, fmt.Errorf("%w %q: missing unit (bits: kbit, mbit, gbit; bytes: KB, MB, GB, KiB, MiB)", ErrBadRate, in)
	}
	f := unitFactor(unit)
	if f == 0 {
		return 0, fmt.Errorf("%w %q: unknown or ambiguous unit %q (write mbit for megabits, MB for megabytes per second)", ErrBadRate, in, unit)
	}
	bps := v * f
	if bps > MaxRate {
		return 0, fmt.Errorf("%w %q: above the maximum of %d bytes/s", ErrBadRate, in, int64(MaxRate))
	}
	r := int64(math.Round(bps))
	if r < 1 {
		return 0, fmt.Errorf("%w %q: below 1 byte/s", ErrBadRate, in)
	}
	return r, nil
}

// unitFactor returns the bytes per unit, or 0 for an unknown unit.
func unitFactor(unit string) float64 {
	if f, ok := byteUnits[unit]; ok {
		return f
	}
	return bitUnits[strings.ToLower(unit)]
}

// FormatRate renders bytes per second so that ParseRate reads it back to the
// same value: in mbit or kbit when the rate is a whole number of them (the
// way links are usually quoted), otherwise in bytes. 0 is "unlimited".
func FormatRate(bytesPerSecond int64) string {
	switch bits := bytesPerSecond * 8; {
	case bytesPerSecond <= 0:
		return "unlimited"
	case bytesPerSecond > MaxRate: // bits would overflow
	case bits%1e6 == 0:
		return strconv.FormatInt(bits/1e6, 10) + "mbit"
	case bits%1e3 == 0:
		return strconv.FormatInt(bits/1e3, 10) + "kbit"
	}
	return strconv.FormatInt(bytesPerSecond, 10) + "B"
}
