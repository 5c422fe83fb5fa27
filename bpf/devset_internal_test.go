package bpf

import (
	"cmp"
	"errors"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/obdtrace/obdtrace/internal/testutil"
)

// TestAddDeviceRollsBack gives AddDevice a slot table too small for the
// device's slot: the failed add must leave neither the set nor the hash
// map holding the device, while a device whose slot fits is added.
func TestAddDeviceRollsBack(t *testing.T) {
	testutil.RequireRoot(t, "BPF maps")
	if err := removeMemlock(); err != nil {
		t.Fatal(err)
	}
	devices, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 1, MaxEntries: 16})
	if err != nil {
		testutil.Missing(t, "cannot create a BPF hash map: %v", err)
	}
	defer devices.Close()
	slots, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer slots.Close()
	c := &Capture{devices: devices, slots: slots, set: map[Dev]struct{}{}}

	var fits, over Dev
	for d := Dev(1); fits == 0 || over == 0; d++ {
		if devHash(d) == 0 {
			fits = cmp.Or(fits, d)
		} else {
			over = cmp.Or(over, d)
		}
	}
	if err := c.AddDevice(over); err == nil {
		t.Fatalf("AddDevice(%s) with slot %d past the table: no error", over, devHash(over))
	}
	if _, ok := c.set[over]; ok {
		t.Errorf("the failed device %s stayed in the set", over)
	}
	var v uint8
	if err := devices.Lookup(uint32(over), &v); !errors.Is(err, ebpf.ErrKeyNotExist) {
		t.Errorf("the failed device %s stayed in the hash map: %v", over, err)
	}
	if err := c.AddDevice(fits); err != nil {
		t.Fatalf("AddDevice(%s): %v", fits, err)
	}
	if err := c.AddDevice(fits); err != nil {
		t.Errorf("adding %s again: %v", fits, err)
	}
	var slot uint32
	if err := slots.Lookup(uint32(0), &slot); err != nil || slot != uint32(fits) {
		t.Errorf("slot 0: %#x, %v; want %#x", slot, err, uint32(fits))
	}
	if got, err := c.Devices(); err != nil || len(got) != 1 || got[0] != fits {
		t.Errorf("Devices: %v, %v; want [%s]", got, err, fits)
	}
}
