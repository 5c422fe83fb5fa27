// Package bpf owns obdtrace's eBPF block-request capture: the CO-RE program
// in capture.c (built with bpf2go, object and bindings committed), and a small
// API to load it, choose which block devices it reports, and read the events.
//
// The program hangs off block:block_rq_issue (tp_btf where the kernel's BTF
// offers it, the classic tracepoint otherwise), filters requests in the kernel
// by a set of dev_t, and reports each read request (readahead included) as an
// [Event] through a ring buffer. Writes are reported only when asked; flushes
// and discards never. An optional hook on block_rq_complete adds completion
// events carrying the request's latency.
//
// Events reach the ring in per-CPU batches; [Capture.Read] flushes partial
// batches every MaxDelay and merges the CPUs' streams back into timestamp
// order.
//
// All attachments are FD-based BPF links owned by the [Capture]: Close, or
// the death of the process, detaches everything. The package does not know
// about images or offsets inside them; that is the recorder's job.
package bpf
