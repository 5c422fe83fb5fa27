package bpf

// capture_bpfel.o and capture_bpfel.go are committed; `make generate` (which
// runs go generate) rebuilds them with Debian's clang 14 and llvm-strip.
// vmlinux.h comes from the kernel this was developed on, and CO-RE relocations
// let the object load on any kernel with BTF:
//
//	bpftool btf dump file /sys/kernel/btf/vmlinux format c > vmlinux.h

//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang -cflags "-O2 -g -Wall -Werror" -target bpfel -type obd_event -type obd_hdr -type inflight_key capture capture.c -- -I/usr/include/bpf -I.
