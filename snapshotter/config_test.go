package snapshotter

import (
	"errors"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/obdtrace/obdtrace/snapshotter/backstore/blobcache"
	"github.com/obdtrace/obdtrace/snapshotter/backstore/device"
)

// TestCacheConfigMatchesBlobcache checks that Validate accepts exactly the
// cache sizes blobcache.Open accepts from an image server, so that a bad
// size is refused at start-up and not by every image server.
func TestCacheConfigMatchesBlobcache(t *testing.T) {
	const kib, mib = 1 << 10, 1 << 20
	cases := []struct {
		cache CacheConfig
		ok    bool
	}{
		{CacheConfig{}, true},
		{CacheConfig{BlockSize: 4 * kib, RefillSize: 4 * kib}, true},
		{CacheConfig{BlockSize: 16 * mib}, true},
		{CacheConfig{BlockSize: 128 * kib, RefillSize: 512 * kib, MaxBytes: 2 * mib}, true},
		{CacheConfig{RefillSize: 64 * kib}, true},
		{CacheConfig{BlockSize: 1000}, false},
		{CacheConfig{BlockSize: 96 * kib}, false},
		{CacheConfig{BlockSize: 2 * kib}, false},
		{CacheConfig{BlockSize: 32 * mib}, false},
		{CacheConfig{BlockSize: -4096}, false},
		{CacheConfig{BlockSize: 64 * kib, RefillSize: 100 * kib}, false},
		{CacheConfig{BlockSize: 64 * kib, RefillSize: 32 * kib}, false},
		{CacheConfig{RefillSize: -1}, false},
		// A multiple of the block size, but not a divisor of the
		// default readahead span.
		{CacheConfig{BlockSize: 64 * kib, RefillSize: 192 * kib}, false},
		{CacheConfig{RefillSize: 128 * mib}, false},
		{CacheConfig{MaxBytes: -1}, false},
		{CacheConfig{MaxBytes: 2000}, false},
	}
	for i, c := range cases {
		cfg := DefaultConfig()
		cfg.Root = t.TempDir()
		cfg.Cache = c.cache
		verr := cfg.Validate()
		if (verr == nil) != c.ok || (verr != nil && !errors.Is(verr, ErrConfig)) {
			t.Errorf("%+v: Validate = %v, want ok %v", c.cache, verr, c.ok)
		}
		bc, oerr := blobcache.Open(filepath.Join(t.TempDir(), strconv.Itoa(i)), blobcache.Options{
			MaxBytes: c.cache.MaxBytes, RefillSize: c.cache.RefillSize, BlockSize: c.cache.BlockSize,
		})
		if oerr == nil {
			bc.Close()
		}
		if (oerr == nil) != c.ok {
			t.Errorf("%+v: blobcache.Open = %v, want ok %v (the rules in CacheConfig.validate are out of date)", c.cache, oerr, c.ok)
		}
	}
}

// TestDeviceConfig: device.readahead_kb is validated, and reaches the image
// server as the default tuning with only the readahead changed.
func TestDeviceConfig(t *testing.T) {
	for _, c := range []struct {
		kb int
		ok bool
	}{{0, true}, {4, true}, {1024, true}, {16384, true}, {-4, false}, {6, false}, {16388, false}} {
		cfg := DefaultConfig()
		cfg.Root = t.TempDir()
		cfg.Device.ReadAheadKB = c.kb
		if err := cfg.Validate(); (err == nil) != c.ok || (err != nil && !errors.Is(err, ErrConfig)) {
			t.Errorf("readahead_kb %d: Validate = %v, want ok %v", c.kb, err, c.ok)
		}
	}
	if tun := (DeviceConfig{}).tuning(); tun != nil {
		t.Errorf("nothing set: tuning %+v, want the device's defaults (nil)", *tun)
	}
	want := device.DefaultTuning()
	want.ReadAhead = 1 << 20
	if tun := (DeviceConfig{ReadAheadKB: 1024}).tuning(); tun == nil || *tun != want {
		t.Errorf("readahead_kb 1024: tuning %v, want %+v", tun, want)
	}
}
