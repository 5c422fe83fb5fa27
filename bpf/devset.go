package bpf

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// The program's slot table (obd_slots in capture.c): numSlots entries, each
// 0, the one device of the set that hashes there, or slotShared.
const (
	numSlots   = 4096
	slotShared = ^uint32(0)
)

// devHash must match dev_hash in capture.c.
func devHash(d Dev) uint32 { return (uint32(d) * 0x9E3779B1) >> 20 }

// slotValue is what slot h of the table holds for set: slotShared sends the
// program to the hash map, which is needed when several devices share the
// slot, or when the one device there could be mistaken for an empty slot
// (0) or for the marker itself.
func slotValue(set map[Dev]struct{}, h uint32) uint32 {
	var (
		v uint32
		n int
	)
	for d := range set {
		if devHash(d) == h {
			v, n = uint32(d), n+1
		}
	}
	switch {
	case n == 0:
		return 0
	case n > 1 || v == 0 || v == slotShared:
		return slotShared
	}
	return v
}

// AddDevice starts reporting requests to d. Adding a device already in the
// set is not an error.
func (c *Capture) AddDevice(d Dev) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	if _, ok := c.set[d]; ok {
		return nil
	}
	if err := c.devices.Update(uint32(d), uint8(1), ebpf.UpdateAny); err != nil {
		if errors.Is(err, unix.E2BIG) {
			return fmt.Errorf("bpf: add device %s: device set is full (%d devices)", d, MaxDevices)
		}
		return fmt.Errorf("bpf: add device %s: %w", d, err)
	}
	c.set[d] = struct{}{}
	// After the hash map: once the slot names d, the program may look for
	// it there.
	if err := c.writeSlot(devHash(d)); err != nil {
		// Undone, so that the set is what Devices lists and what the
		// program sees: the slot still holds its old value, which the
		// set without d gives again.
		delete(c.set, d)
		if derr := c.devices.Delete(uint32(d)); derr != nil && !errors.Is(derr, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("bpf: add device %s: %w; undo: %w", d, err, derr)
		}
		return fmt.Errorf("bpf: add device %s: %w", d, err)
	}
	return nil
}

// RemoveDevice stops reporting requests to d; requests already reported are
// still delivered. Removing a device not in the set is not an error.
func (c *Capture) RemoveDevice(d Dev) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	delete(c.set, d)
	if err := c.writeSlot(devHash(d)); err != nil {
		return err
	}
	if err := c.devices.Delete(uint32(d)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("bpf: remove device %s: %w", d, err)
	}
	return nil
}

// writeSlot rewrites slot h from the set; c.mu is held.
func (c *Capture) writeSlot(h uint32) error {
	if err := c.slots.Update(h, slotValue(c.set, h), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("bpf: update device slot %d: %w", h, err)
	}
	return nil
}

// Devices lists the device set, in no particular order.
func (c *Capture) Devices() ([]Dev, error) {
	if err := c.checkOpen(); err != nil {
		return nil, err
	}
	var (
		out []Dev
		key uint32
		val uint8
	)
	it := c.devices.Iterate()
	for it.Next(&key, &val) {
		out = append(out, Dev(key))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("bpf: list devices: %w", err)
	}
	return out, nil
}
