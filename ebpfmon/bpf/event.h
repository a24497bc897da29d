// SPDX-License-Identifier: GPL-2.0
// The event record, its way to user space and the judging of remote
// ranges against the key pages, shared by monitor.c (syscall and io_uring
// tracepoints, detect mode) and enforce.c (the BPF LSM, which reports
// every attempt itself in deny mode). The loader hands monitor.c's events and drops maps
// to enforce.c, so that one ring buffer carries both.
#ifndef KEYGATE_EVENT_H
#define KEYGATE_EVENT_H

#include "common.h"

#define MAX_IOV 16
enum technique {
	T_VM_READV = 1,
	T_VM_WRITEV = 2,
	T_PTRACE_ATTACH = 3,
	T_PTRACE_SEIZE = 4,
	T_PTRACE_PEEK = 5,
	T_PTRACE_POKE = 6,
	T_PROC_MEM = 7,
	T_PROC_ENVIRON = 8,
	T_PROC_MAPS = 9,
	T_PIDFD_GETFD = 10,
	T_PERF_EVENT_OPEN = 11,
	T_KCORE = 12,
	T_DEVMEM = 13,
	T_BPF_FD = 14,
	T_BPF_PROG_LOAD = 15,
};

enum flags {
	F_OVERLAP = 1,   // the request touches key pages
	F_TRUNCATED = 2, // more remote iovecs than the program checks
	F_WHOLE = 4,     // the whole address space is protected
	F_RESOLVED = 8,  // an open's target was read from the opened inode
	F_OPENAT2 = 16,
	F_DENIED = 32,   // an enforce.c program refused this attempt
	F_OPEN = 64,     // open(2): no directory fd, flags second
	F_CREAT = 128,   // creat(2): no directory fd, no flags (O_CREAT|O_WRONLY|O_TRUNC)
	F_IO_URING = 256, // an io_uring IORING_OP_OPENAT/OPENAT2, seen at completion
	F_COMPAT = 512,  // a 32-bit syscall (int 0x80) of any process
	F_PERF_CPU = 1024,    // perf_event_open(pid -1): every process on a CPU
	F_PERF_CGROUP = 2048, // perf_event_open in cgroup mode
	F_IOV_CHANGED = 4096, // the remote iovecs read at exit differ from those at entry
	F_IOV_UNREAD = 8192,  // the remote iovecs could not be read at entry nor at exit
	F_LSM = 16384,        // seen by an enforce.c (BPF LSM) program: result is the LSM's verdict
};

struct event {
	__u64 ktime; // CLOCK_MONOTONIC at syscall entry (for opens, at exit)
	__u64 cgroup_id;
	__u64 addr; // first remote range touching key pages, else the first
	__u64 len;
	__u64 overlap; // bytes of key pages the request covers
	__u64 total;   // bytes the request covers
	__s64 result;
	__u64 arg; // ptrace request, open flags, perf type, pidfd_getfd's fd
	__u32 pid;
	__u32 tgid;
	__u32 uid;
	__u32 target; // the pid as the caller named it
	__u32 target_tgid;
	__u32 technique;
	__u32 flags;
	__u32 niov;
	__s32 nr; // syscall number, to pair entry with exit
	__u32 _pad;
	__u64 sample_type; // perf_event_open's attr.sample_type
	char comm[16];
	char exe[EXE_LEN];
	char path[PATH_LEN];
};
const struct event *unused_event __attribute__((unused));

struct iovec_u {
	__u64 base;
	__u64 len;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

// drops counts events lost because the ringbuf was full.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

struct scratch {
	struct event e;
	struct iovec_u iov[MAX_IOV];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch SEC(".maps");

static __always_inline struct scratch *new_event(__u32 technique, __s32 nr)
{
	__u32 zero = 0;
	struct scratch *s = bpf_map_lookup_elem(&scratch, &zero);
	if (!s)
		return 0;
	struct event *e = &s->e;
	__builtin_memset(e, 0, sizeof(*e));
	__u64 id = bpf_get_current_pid_tgid();
	e->ktime = bpf_ktime_get_ns();
	e->pid = (__u32)id;
	e->tgid = id >> 32;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->technique = technique;
	e->nr = nr;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	struct task_struct *t = (void *)bpf_get_current_task();
	const unsigned char *exe = BPF_CORE_READ(t, mm, exe_file, f_path.dentry, d_name.name);
	if (exe)
		bpf_probe_read_kernel_str(e->exe, sizeof(e->exe), exe);
	return s;
}

static __always_inline void send(struct event *e)
{
	if (bpf_ringbuf_output(&events, e, sizeof(*e), 0)) {
		__u32 zero = 0;
		__u64 *d = bpf_map_lookup_elem(&drops, &zero);
		if (d)
			*d += 1;
	}
}

// add_range adds the key-page bytes of [base, base+len) to e.
static __always_inline void add_range(struct event *e, struct protected_proc *p, __u64 base, __u64 len, int first)
{
	__u64 end = base + len;
	__u64 hit = 0;

	if (end < base)
		end = ~0ULL;
	if (p->whole) {
		hit = end - base;
	} else {
		for (int j = 0; j < MAX_RANGES; j++) {
			if (j >= p->n)
				break;
			__u64 s = p->r[j].start > base ? p->r[j].start : base;
			__u64 t = p->r[j].end < end ? p->r[j].end : end;
			if (t > s)
				hit += t - s;
		}
	}
	e->total += end - base;
	if (hit && !(e->flags & F_OVERLAP)) {
		e->flags |= F_OVERLAP;
		e->addr = base;
		e->len = len;
	} else if (first) {
		e->addr = base;
		e->len = len;
	}
	e->overlap += hit;
}

struct range_ctx {
	struct event *e;
	struct protected_proc *p;
	struct iovec_u *iov;
};

static long range_cb(__u32 i, void *data)
{
	struct range_ctx *c = data;
	if (i >= MAX_IOV)
		return 1;
	add_range(c->e, c->p, c->iov[i].base, c->iov[i].len, i == 0);
	return 0;
}

// event_on starts an event of technique against pid when pid is a thread of
// a protected process other than the caller's own; *pp is that process's
// entry, for the callers that check addresses against its key ranges.
static __always_inline struct scratch *event_on(__u32 pid, __u32 technique, __s32 nr, struct protected_proc **pp)
{
	__u32 tgid;
	struct protected_proc *p = lookup_target(pid, &tgid);
	if (!p)
		return 0;
	if ((bpf_get_current_pid_tgid() >> 32) == tgid)
		return 0;
	struct scratch *s = new_event(technique, nr);
	if (!s)
		return 0;
	s->e.target = pid;
	s->e.target_tgid = tgid;
	if (p->whole)
		s->e.flags |= F_WHOLE;
	*pp = p;
	return s;
}

// judge_iov reads n remote iovecs from rvec into s->iov and adds their key
// overlap to e; it returns 0 when they could not be read (or n is 0).
// compat: they are a 32-bit caller's struct compat_iovec (two u32s each),
// widened in place.
static __always_inline int judge_iov(struct scratch *s, struct event *e, struct protected_proc *p, const void *rvec, __u64 n,
				     int compat)
{
	if (!n || n > MAX_IOV)
		return 0;
	if (compat) {
		__u32 *w = (__u32 *)s->iov;

		if (bpf_probe_read_user(s->iov, n * 2 * sizeof(__u32), rvec))
			return 0;
		// From the last: iovec i's 16 bytes never cover a compat_iovec
		// below i not yet widened.
		for (int i = MAX_IOV - 1; i >= 0; i--) {
			if (i >= n)
				continue;
			__u64 base = w[2 * i], len = w[2 * i + 1];
			s->iov[i].base = base;
			s->iov[i].len = len;
		}
	} else if (bpf_probe_read_user(s->iov, n * sizeof(struct iovec_u), rvec)) {
		return 0;
	}
	// bpf_loop, so that the verifier checks one iovec against the ranges
	// once rather than every iovec against every range.
	struct range_ctx rc = {.e = e, .p = p, .iov = s->iov};
	bpf_loop(n, range_cb, &rc, 0);
	return 1;
}

#endif
