package bpf

import (
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// Errors for a machine that cannot run the capture; Open wraps them with
// what was missing and how to fix it.
var (
	// ErrPermission: not root, and lacking CAP_BPF plus CAP_PERFMON.
	ErrPermission = errors.New("bpf: insufficient privileges")
	// ErrMemlock: RLIMIT_MEMLOCK could not be lifted (kernels before 5.11
	// charge BPF memory to it).
	ErrMemlock = errors.New("bpf: cannot lift RLIMIT_MEMLOCK")
	// ErrNoBTF: the kernel exposes no BTF, which CO-RE needs.
	ErrNoBTF = errors.New("bpf: kernel BTF not available")
	// ErrNoTracepoint: the block_rq_issue hook the mode needs is missing.
	ErrNoTracepoint = errors.New("bpf: block tracepoint not available")
	// ErrBadRingSize: Options.RingSize is not a power of two of at least
	// a page.
	ErrBadRingSize = errors.New("bpf: bad ring buffer size")
)

const maxRingSize = 1 << 30

func checkRingSize(n int) (uint32, error) {
	if n == 0 {
		return DefaultRingSize, nil
	}
	if n < os.Getpagesize() || n > maxRingSize || n&(n-1) != 0 {
		return 0, fmt.Errorf("%w: %d bytes (want a power of two in [%d, %d])",
			ErrBadRingSize, n, os.Getpagesize(), maxRingSize)
	}
	return uint32(n), nil
}

// checkPrivileges fails early, with a message naming the capabilities, where
// the kernel would only say EPERM at load time.
func checkPrivileges() error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return nil // cannot tell: let the load report what the kernel says
	}
	eff := uint64(data[1].Effective)<<32 | uint64(data[0].Effective)
	if !hasCaps(eff) {
		return fmt.Errorf("%w: run as root, or grant CAP_BPF and CAP_PERFMON "+
			"(e.g. setcap cap_bpf,cap_perfmon+ep on the binary); effective capabilities are %#x",
			ErrPermission, eff)
	}
	return nil
}

// hasCaps reports whether an effective capability set can load and attach
// tracing programs: CAP_SYS_ADMIN alone, or CAP_BPF with CAP_PERFMON.
func hasCaps(eff uint64) bool {
	has := func(c int) bool { return eff&(1<<c) != 0 }
	return has(unix.CAP_SYS_ADMIN) || (has(unix.CAP_BPF) && has(unix.CAP_PERFMON))
}

func removeMemlock() error {
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("%w: %v (raise it: ulimit -l unlimited, or LimitMEMLOCK=infinity in the systemd unit)",
			ErrMemlock, err)
	}
	return nil
}

// explainErrno adds the likely causes to the kernel's terse EPERM.
func explainErrno(err error) error {
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return fmt.Errorf("%w: %w (with CAP_BPF and CAP_PERFMON held, this means kernel lockdown, "+
			"a seccomp filter, or RLIMIT_MEMLOCK on kernels before 5.11)", ErrPermission, err)
	}
	return err
}

// chooseMode resolves AttachAuto and checks the chosen hook exists.
func chooseMode(want AttachMode, kernel *btf.Spec) (AttachMode, error) {
	switch want {
	case AttachAuto:
		if hasBTFTracepoint(kernel) {
			return AttachBTF, nil
		}
		if err := checkTracefs(); err != nil {
			return 0, fmt.Errorf("%w: kernel BTF lacks btf_trace_block_rq_issue, and %w", ErrNoTracepoint, err)
		}
		return AttachTracepoint, nil
	case AttachBTF:
		if !hasBTFTracepoint(kernel) {
			return 0, fmt.Errorf("%w: kernel BTF has no btf_trace_block_rq_issue (tp_btf); try the classic tracepoint",
				ErrNoTracepoint)
		}
		return AttachBTF, nil
	case AttachTracepoint:
		if err := checkTracefs(); err != nil {
			return 0, fmt.Errorf("%w: %w", ErrNoTracepoint, err)
		}
		return AttachTracepoint, nil
	}
	return 0, fmt.Errorf("bpf: unknown attach mode %d", int(want))
}

func hasBTFTracepoint(kernel *btf.Spec) bool {
	var td *btf.Typedef
	return kernel.TypeByName("btf_trace_block_rq_issue", &td) == nil
}

// tracefsRoots are where cilium/ebpf looks for tracefs, in its order.
func tracefsRoots() [2]string {
	return [2]string{"/sys/kernel/tracing", "/sys/kernel/debug/tracing"}
}

// checkTracefs finds the classic tracepoint's id file, which attaching by
// perf event needs.
func checkTracefs() error {
	for _, root := range tracefsRoots() {
		if _, err := os.Stat(root + "/events/block/block_rq_issue/id"); err == nil {
			return nil
		}
	}
	for _, root := range tracefsRoots() {
		var st unix.Statfs_t
		if unix.Statfs(root, &st) == nil && st.Type == unix.TRACEFS_MAGIC {
			return fmt.Errorf("tracefs at %s has no events/block/block_rq_issue", root)
		}
	}
	return errors.New("tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)")
}
