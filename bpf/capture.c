//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// Block-request capture for obdtrace: reports the read requests issued to a
// kernel-side set of block devices, through a ring buffer.
//
// Two program families are built into one object and the loader picks one:
//   - tp_btf/block_rq_issue (+ block_rq_complete): BTF-typed raw tracepoints,
//     cheapest, reading struct request directly with CO-RE relocations;
//   - tracepoint/block/block_rq_issue (+ block_rq_complete): the classic
//     tracepoints, for kernels whose BTF lacks the btf_trace_* typedefs.
// Either way the links are FD-based, so nothing outlives the loading process.
//
// Events are staged per CPU and reach the ring buffer in batches (one
// reservation per batch, not per event); a third program, never attached,
// is run by the reader on each CPU to flush partial batches.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

// Op flags reported to user space; kept in sync with bpf.Op in Go.
#define OBD_OP_READ 1
#define OBD_OP_WRITE 2
#define OBD_OP_READAHEAD 4
#define OBD_OP_SYNC 8
#define OBD_OP_META 16

#define OBD_KIND_ISSUE 0
#define OBD_KIND_COMPLETE 1

// REQ_OP_BITS is a macro, so it is not in BTF; it has been 8 since 4.10.
#define OBD_REQ_OP_MASK 0xff
// MINORBITS, same story: the kernel's internal dev_t is major<<20 | minor.
#define OBD_MINORBITS 20

// One event. Layout is decoded by hand in event.go: change both.
struct obd_event {
	__u64 ts_ns;      // bpf_ktime_get_ns (CLOCK_MONOTONIC)
	__u64 sector;     // start sector (512 bytes) on the whole disk
	__u64 cgroup_id;  // cgroup v2 id of the current task
	__u64 latency_ns; // completion events only
	__u32 dev;        // kernel dev_t of the disk
	__u32 sectors;
	__u32 pid; // tgid
	__u32 tid;
	__u32 op; // OBD_OP_*
	__s32 status; // completion events only: blk_status_t / -errno
	__u8 kind;    // OBD_KIND_*
	__u8 pad[7];
	char comm[16];
};

// Set by the loader before the verifier sees the program, so the unused
// branches are removed entirely.
const volatile bool include_writes = false;
const volatile bool track_latency = false;
// Waking the reader costs it a context switch and a system call, more than
// the event itself; at a few hundred thousand reads a second, waking per
// event would be most of the capture's cost. So by default events go in
// silently and the reader polls the ring on a timer.
const volatile bool no_wakeup = false;
// Events per batch, at most OBD_BATCH_MAX; 0 or 1 sends each event to the
// ring on its own. Set by the loader from the ring's size.
const volatile __u32 batch_len = 0;
// A batch whose first event is this old is sent with the next event, full
// or not, so a CPU that keeps issuing never leaves events waiting long;
// the reader flushes batches a quiet CPU left behind. Half of MaxDelay.
const volatile __u64 max_age_ns = 25000000;

// A ring record is a header and hdr.count events of one CPU, in the order
// that CPU produced them (their timestamps do not decrease), unless
// OBD_HDR_UNORDERED is set: an event that bypassed its CPU's batch because
// the batch was busy (a completion interrupting an issue, say), which may be
// older than events already in the ring from that CPU.
struct obd_hdr {
	__u32 cpu;
	__u32 count;
};

#define OBD_HDR_UNORDERED 0x80000000U
#define OBD_BATCH_MAX 64

// The state of a CPU's batch, apart from its events so that the reader can
// read every CPU's in one small lookup. Programs on one CPU never run side
// by side, but one may interrupt another (a completion in an interrupt, or
// the reader's flush in an IPI): busy tells the interrupting one to keep
// off. Plain loads and stores suffice for that, both sides being on one CPU.
struct obd_head {
	__u32 busy;
	__u32 count;    // events in the batch
	__u64 first_ns; // the first one's timestamp
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct obd_head);
} obd_head SEC(".maps");

// A CPU's batch of events, sent to the ring as one record with its header.
struct obd_stage {
	struct obd_hdr hdr;
	struct obd_event ev[OBD_BATCH_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct obd_stage);
} obd_stage SEC(".maps");

// A record of one event, when it does not go through a batch.
struct obd_single {
	struct obd_hdr hdr;
	struct obd_event ev;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20); // overridden by Options.RingSize
} obd_events SEC(".maps");

// The device set: key is the kernel dev_t, the value is unused. The
// program consults it only for slots marked OBD_SLOT_SHARED below.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} obd_devices SEC(".maps");

// A direct-mapped table in front of obd_devices, indexed by dev_hash(dev):
// 0 when no device of the set hashes there, the device itself when exactly
// one does, OBD_SLOT_SHARED when more do (or the device is 0 or
// OBD_SLOT_SHARED itself). A request costs one array load and a compare,
// hit or miss; the hash lookup (~45 to 65 ns) is left for shared slots.
// User space adds a device to the hash before its slot, and removes it
// from the hash after, so a slot never names a device the hash lacks.
#define OBD_SLOTS 4096
#define OBD_SLOT_SHARED 0xffffffffU

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, OBD_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} obd_slots SEC(".maps");

// Events dropped because the ring was full, per CPU so the hot path never
// contends on a shared cache line.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} obd_lost SEC(".maps");

// Issue time of requests in flight, for the completion hook. The key is the
// struct request address (tp_btf) or the dev_t (classic tracepoints), plus
// the start sector. LRU, so requests whose completion we never see (requeue,
// detach in between) cannot fill it up.
struct inflight_key {
	__u64 id;
	__u64 sector;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384); // shrunk to 1 by the loader when unused
	__type(key, struct inflight_key);
	__type(value, __u64);
} obd_inflight SEC(".maps");

// Referenced so clang emits their BTF, from which bpf2go generates the Go
// types the layout test compares against event.go.
const struct obd_event *const unused_event __attribute__((unused)) = 0;
const struct inflight_key *const unused_key __attribute__((unused)) = 0;
const struct obd_hdr *const unused_hdr __attribute__((unused)) = 0;

char LICENSE[] SEC("license") = "Dual MIT/GPL";

#define barrier() asm volatile("" ::: "memory")
#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile typeof(x) *)&(x) = (v))

static __always_inline void count_lost(__u32 n)
{
	__u32 zero = 0;
	__u64 *lost = bpf_map_lookup_elem(&obd_lost, &zero);

	if (lost)
		*lost += n; // per-CPU slot: no atomic needed
}

// classify turns request flags into OBD_OP_* bits, or 0 for requests we do
// not report (writes unless asked, flushes, discards, zone ops, ...).
static __always_inline __u32 classify(__u32 cmd_flags)
{
	__u32 op = cmd_flags & OBD_REQ_OP_MASK;
	__u32 out;

	if (op == bpf_core_enum_value(enum req_op, REQ_OP_READ))
		out = OBD_OP_READ;
	else if (include_writes && op == bpf_core_enum_value(enum req_op, REQ_OP_WRITE))
		out = OBD_OP_WRITE;
	else
		return 0;

	if (cmd_flags & (1U << bpf_core_enum_value(enum req_flag_bits, __REQ_RAHEAD)))
		out |= OBD_OP_READAHEAD;
	if (cmd_flags & (1U << bpf_core_enum_value(enum req_flag_bits, __REQ_SYNC)))
		out |= OBD_OP_SYNC;
	if (cmd_flags & (1U << bpf_core_enum_value(enum req_flag_bits, __REQ_META)))
		out |= OBD_OP_META;
	return out;
}

// classify_rwbs does the same from the classic tracepoint's rwbs string
// (see blk_fill_rwbs): an optional 'F' (preflush), the op letter, then
// F (FUA), A (readahead), S (sync), M (meta).
static __always_inline __u32 classify_rwbs(const char *rwbs)
{
	__u32 out;
	int i = 0;

	if (rwbs[0] == 'F')
		i = 1;
	if (rwbs[i] == 'R')
		out = OBD_OP_READ;
	else if (include_writes && rwbs[i] == 'W')
		out = OBD_OP_WRITE;
	else
		return 0;

	// rwbs is char[10] and NUL-terminated: at most 8 letters follow.
	for (int j = i + 1; j < 10; j++) {
		char c = rwbs[j];

		if (c == 0)
			break;
		if (c == 'A')
			out |= OBD_OP_READAHEAD;
		else if (c == 'S')
			out |= OBD_OP_SYNC;
		else if (c == 'M')
			out |= OBD_OP_META;
	}
	return out;
}

static __always_inline __u64 wakeup_flags(void)
{
	return no_wakeup ? BPF_RB_NO_WAKEUP : 0;
}

// The request fields of an event, gathered by the hook-specific code.
struct obd_req {
	__u32 dev;
	__u32 sectors;
	__u64 sector;
	__u32 op;
	__s32 status;
};

// fill_task records the current task. tp_btf programs read it straight
// from task_struct, which measured ~25% cheaper per event than the three
// helper calls (pid_tgid, cgroup id, comm) the classic tracepoint uses.
static __always_inline void fill_task(struct obd_event *e, bool btf)
{
	if (btf) {
		struct task_struct *t = bpf_get_current_task_btf();

		e->pid = t->tgid;
		e->tid = t->pid;
		e->cgroup_id = t->cgroups->dfl_cgrp->kn->id; // as bpf_get_current_cgroup_id
		__builtin_memcpy(e->comm, t->comm, sizeof(e->comm));
		return;
	}
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	e->pid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
}

// fill writes every field of e; issued is the issue time of a completion,
// 0 for an issue.
static __always_inline void fill(struct obd_event *e, const struct obd_req *r, __u8 kind, __u64 now,
				 __u64 issued, bool btf)
{
	e->ts_ns = now;
	e->sector = r->sector;
	e->latency_ns = issued ? now - issued : 0;
	e->dev = r->dev;
	e->sectors = r->sectors;
	e->op = r->op;
	e->status = r->status;
	e->kind = kind;
	__builtin_memset(e->pad, 0, sizeof(e->pad));
	fill_task(e, btf);
}

// send_batch sends a CPU's first n staged events as one record; its head
// is held. A full ring loses the whole batch, counted event by event.
static __always_inline void send_batch(struct obd_stage *s, __u32 n)
{
	__u64 size = (__u64)n * sizeof(struct obd_event);

	// Hidden from clang, which would otherwise know size is a multiple of
	// 16 and add the header size with an OR, whose bounds the verifier
	// loses; the check is then kept, and bounds the size for the verifier.
	asm volatile("" : "+r"(size));
	if (size > sizeof(s->ev))
		size = sizeof(s->ev); // never
	s->hdr.cpu = bpf_get_smp_processor_id();
	s->hdr.count = n;
	if (bpf_ringbuf_output(&obd_events, &s->hdr, sizeof(s->hdr) + size, wakeup_flags()))
		count_lost(n);
}

// emit_single sends one event as a record of its own.
static __always_inline __u64 emit_single(const struct obd_req *r, __u8 kind, __u64 issued, bool btf, bool unordered)
{
	struct obd_single *d = bpf_ringbuf_reserve(&obd_events, sizeof(*d), 0);
	__u64 now = bpf_ktime_get_ns();

	if (!d) {
		count_lost(1);
		return now;
	}
	d->hdr.cpu = bpf_get_smp_processor_id() | (unordered ? OBD_HDR_UNORDERED : 0);
	d->hdr.count = 1;
	fill(&d->ev, r, kind, now, issued, btf);
	bpf_ringbuf_submit(d, wakeup_flags());
	return now;
}

// emit reports one request and returns its timestamp. It is taken while
// the batch is held, so a flush that found the batch free has every event
// older than itself, which lets the reader restore the order across CPUs.
static __always_inline __u64 emit(const struct obd_req *r, __u8 kind, __u64 issued, bool btf)
{
	__u32 zero = 0;
	struct obd_head *h = NULL;
	struct obd_stage *s = NULL;

	if (batch_len > 1) {
		h = bpf_map_lookup_elem(&obd_head, &zero);
		s = bpf_map_lookup_elem(&obd_stage, &zero);
	}
	if (!h || !s || READ_ONCE(h->busy))
		return emit_single(r, kind, issued, btf, h && s);
	WRITE_ONCE(h->busy, 1);
	barrier();
	__u32 n = h->count;

	if (n >= OBD_BATCH_MAX)
		n = 0; // never: a full batch is sent at once; bounds the index
	__u64 now = bpf_ktime_get_ns();

	if (n == 0)
		h->first_ns = now;
	fill(&s->ev[n], r, kind, now, issued, btf);
	n++;
	if (n >= batch_len || now - h->first_ns >= max_age_ns) {
		send_batch(s, n);
		n = 0;
	}
	h->count = n;
	barrier();
	WRITE_ONCE(h->busy, 0);
	return now;
}

// dev_hash picks one of the OBD_SLOTS slots: the top 12 bits of a
// multiplicative (Fibonacci) hash. Must match devHash in devset.go.
static __always_inline __u32 dev_hash(__u32 dev)
{
	return (dev * 0x9E3779B1U) >> 20;
}

static __always_inline bool captured(__u32 dev)
{
	__u32 h = dev_hash(dev);
	__u32 *slot = bpf_map_lookup_elem(&obd_slots, &h);

	if (!slot)
		return false;
	__u32 v = *slot;

	if (v != OBD_SLOT_SHARED)
		return v == dev && v != 0;
	return bpf_map_lookup_elem(&obd_devices, &dev) != NULL;
}

static __always_inline void on_issue(const struct obd_req *r, __u64 id, bool btf)
{
	if (!captured(r->dev))
		return;
	// Still inside the tracepoint: the driver has not seen the request, so
	// its completion cannot come before the issue time is stored.
	__u64 now = emit(r, OBD_KIND_ISSUE, 0, btf);

	if (track_latency) {
		struct inflight_key key = { .id = id, .sector = r->sector };

		bpf_map_update_elem(&obd_inflight, &key, &now, BPF_ANY);
	}
}

static __always_inline void on_complete(const struct obd_req *r, __u64 id, bool btf)
{
	struct inflight_key key = { .id = id, .sector = r->sector };
	__u64 *issued = bpf_map_lookup_elem(&obd_inflight, &key);

	if (!issued)
		return; // not a request we reported, or issued before we attached
	__u64 at = *issued;

	bpf_map_delete_elem(&obd_inflight, &key);
	emit(r, OBD_KIND_COMPLETE, at, btf);
}

// rq_dev mirrors the tracepoint's own disk_devt(rq->q->disk): requests are
// issued against the whole disk, partitions already remapped.
static __always_inline __u32 rq_dev(struct request *rq)
{
	struct gendisk *disk = rq->q->disk;

	if (!disk)
		return 0;
	return ((__u32)disk->major << OBD_MINORBITS) | (__u32)disk->first_minor;
}

SEC("tp_btf/block_rq_issue")
int BPF_PROG(obd_rq_issue, struct request *rq)
{
	// Classify first: it only reads the flags, and most of what a busy
	// machine issues is not a read of a captured device.
	struct obd_req r = { .op = classify(rq->cmd_flags) };

	if (!r.op)
		return 0;
	r.dev = rq_dev(rq);
	r.sector = rq->__sector;
	r.sectors = rq->__data_len >> 9;
	on_issue(&r, (__u64)rq, true);
	return 0;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(obd_rq_complete, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	if (!track_latency)
		return 0;
	struct obd_req r = {
		.dev = rq_dev(rq),
		.sector = rq->__sector,
		.sectors = nr_bytes >> 9,
		.op = classify(rq->cmd_flags),
		.status = error,
	};

	on_complete(&r, (__u64)rq, true);
	return 0;
}

// The classic tracepoints give no request address: requests in flight are
// told apart by device and sector instead.
SEC("tracepoint/block/block_rq_issue")
int obd_tp_issue(struct trace_event_raw_block_rq *ctx)
{
	char rwbs[10];

	// Loading ctx->rwbs[i] directly makes clang add the field's offset to
	// the ctx pointer, which the verifier rejects: copy it out instead.
	if (bpf_core_read(rwbs, sizeof(rwbs), &ctx->rwbs))
		return 0;
	struct obd_req r = { .op = classify_rwbs(rwbs) };

	if (!r.op)
		return 0;
	r.dev = ctx->dev;
	r.sector = ctx->sector;
	r.sectors = ctx->nr_sector;
	on_issue(&r, r.dev, false);
	return 0;
}

SEC("tracepoint/block/block_rq_complete")
int obd_tp_complete(struct trace_event_raw_block_rq_completion *ctx)
{
	char rwbs[10];

	if (!track_latency || bpf_core_read(rwbs, sizeof(rwbs), &ctx->rwbs))
		return 0;
	struct obd_req r = {
		.dev = ctx->dev,
		.sector = ctx->sector,
		.sectors = ctx->nr_sector,
		.op = classify_rwbs(rwbs),
		.status = ctx->error,
	};

	on_complete(&r, r.dev, false);
	return 0;
}

// obd_flush sends the partial batch of the CPU it runs on. It is never
// attached: the reader runs it on a CPU (BPF_PROG_TEST_RUN with
// BPF_F_TEST_RUN_ON_CPU, an IPI) whose batch has waited too long, and on
// every CPU after Detach. It returns 1 if it interrupted a program holding
// the batch: try again.
SEC("raw_tp")
int obd_flush(void *ctx)
{
	__u32 zero = 0;
	struct obd_head *h = bpf_map_lookup_elem(&obd_head, &zero);
	struct obd_stage *s = bpf_map_lookup_elem(&obd_stage, &zero);

	if (!h || !s)
		return 0;
	if (READ_ONCE(h->busy))
		return 1;
	WRITE_ONCE(h->busy, 1);
	barrier();
	__u32 n = h->count;

	if (n) {
		send_batch(s, n);
		h->count = 0;
	}
	barrier();
	WRITE_ONCE(h->busy, 0);
	return 0;
}
