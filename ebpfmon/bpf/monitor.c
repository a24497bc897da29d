// SPDX-License-Identifier: GPL-2.0
// Detect mode: syscall tracepoints that see every way another process can
// read (or write) a protected process's memory. In deny mode the loader
// attaches none of them but newtask and task_exit: enforce.c's BPF LSM
// programs report everything there. Each program looks the named pid up
// in `targets` first, so other processes' syscalls cost one hash lookup; opens
// are the exception (the pid is inside the path): they are seen at exit only,
// and filtered on the opened file's filesystem, or for failed opens on the
// path's first bytes. Other entries build the event in `pending`; their exit
// adds the result and sends it.
#include "event.h"

char LICENSE[] SEC("license") = "GPL";

#define AT_FDCWD -100
#define CLONE_THREAD 0x00010000
#define PERF_FLAG_PID_CGROUP (1U << 2)

struct enter_ctx {
	__u64 common;
	__s32 nr;
	__u32 pad;
	__u64 args[6];
};

struct exit_ctx {
	__u64 common;
	__s32 nr;
	__u32 pad;
	__s64 ret;
};

// pending holds an event between syscall entry and exit, per thread. LRU, so
// that an exit never seen (a tracepoint attached mid-syscall) cannot leak.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct event);
} pending SEC(".maps");

// inflight counts the entries in pending, so that the exit of every traced
// syscall (nearly all of which have nothing pending) is one load, not a hash
// lookup. An entry the LRU evicts leaves it too high, which only costs
// lookups.
volatile __u64 inflight = 0;

static __always_inline void stash(struct event *e)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (bpf_map_update_elem(&pending, &id, e, BPF_NOEXIST) == 0)
		__sync_fetch_and_add(&inflight, 1);
	else
		bpf_map_update_elem(&pending, &id, e, BPF_ANY);
}

static __always_inline void unstash(__u64 id)
{
	if (bpf_map_delete_elem(&pending, &id) == 0)
		__sync_fetch_and_sub(&inflight, 1);
}

// exit_send completes the event this thread stashed at entry.
static __always_inline int exit_send(struct exit_ctx *ctx)
{
	if (!inflight)
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	struct event *e = bpf_map_lookup_elem(&pending, &id);
	if (!e)
		return 0;
	if (e->nr == ctx->nr) {
		e->result = ctx->ret;
		send(e);
	}
	unstash(id);
	return 0;
}

static __always_inline int vm_enter(struct enter_ctx *ctx, __u32 technique)
{
	struct protected_proc *p;
	struct scratch *s = event_on((__u32)ctx->args[0], technique, ctx->nr, &p);
	if (!s)
		return 0;
	struct event *e = &s->e;
	__u64 cnt = ctx->args[4];
	e->niov = cnt > 0xffffffff ? 0xffffffff : cnt;
	__u64 n = cnt;
	if (n > MAX_IOV) {
		n = MAX_IOV;
		e->flags |= F_TRUNCATED;
	}
	if (n && !judge_iov(s, e, p, (void *)ctx->args[3], n, 0))
		e->flags |= F_IOV_UNREAD;
	stash(e);
	return 0;
}

// vm_exit judges the remote iovecs again, as they are when the syscall
// returns, and sends the event with the graver of the two judgements. The
// kernel copies the iovecs between entry and exit, so another thread of the
// caller can show the entry program a harmless vector and the kernel one
// that reaches the key pages; or the vector can sit on a page not yet
// faulted in, which the entry program cannot read (it may not fault) and
// the kernel then faults in. A vector that differs between the two reads is
// itself graded critical (no benign caller rewrites it mid-call). What this
// cannot see is a vector swapped to the key pages and back again entirely
// between the two reads; deny mode refuses every process_vm_readv/writev of
// a protected process whatever its vector (docs/monitor.md).
static __always_inline int vm_exit(struct exit_ctx *ctx)
{
	if (!inflight)
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	struct event *e = bpf_map_lookup_elem(&pending, &id);
	if (!e)
		return 0;
	if (e->nr != ctx->nr)
		goto out;
	__u32 zero = 0;
	struct scratch *s = bpf_map_lookup_elem(&scratch, &zero);
	struct protected_proc *p = bpf_map_lookup_elem(&prot, &e->target_tgid);
	if (s && p) {
		__u64 a[6];
		__u64 n = e->niov > MAX_IOV ? MAX_IOV : e->niov;

		syscall_args(a, 0);
		// s->e is free at exit (new_event is an entry's); judge into it.
		__builtin_memset(&s->e, 0, sizeof(s->e));
		if (judge_iov(s, &s->e, p, (const void *)a[3], n, 0)) {
			if (!(e->flags & F_IOV_UNREAD) &&
			    (s->e.total != e->total || s->e.overlap != e->overlap || s->e.addr != e->addr || s->e.len != e->len))
				e->flags |= F_IOV_CHANGED;
			if (s->e.overlap > e->overlap || (e->flags & F_IOV_UNREAD)) {
				e->flags |= s->e.flags & F_OVERLAP;
				e->addr = s->e.addr;
				e->len = s->e.len;
				e->overlap = s->e.overlap;
				e->total = s->e.total;
			}
			e->flags &= ~F_IOV_UNREAD;
		}
	}
	e->result = ctx->ret;
	send(e);
out:
	unstash(id);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_process_vm_readv")
int vm_readv_enter(struct enter_ctx *ctx) { return vm_enter(ctx, T_VM_READV); }

SEC("tracepoint/syscalls/sys_exit_process_vm_readv")
int vm_readv_exit(struct exit_ctx *ctx) { return vm_exit(ctx); }

SEC("tracepoint/syscalls/sys_enter_process_vm_writev")
int vm_writev_enter(struct enter_ctx *ctx) { return vm_enter(ctx, T_VM_WRITEV); }

SEC("tracepoint/syscalls/sys_exit_process_vm_writev")
int vm_writev_exit(struct exit_ctx *ctx) { return vm_exit(ctx); }

SEC("tracepoint/syscalls/sys_enter_ptrace")
int ptrace_enter(struct enter_ctx *ctx)
{
	__u64 req = ctx->args[0];
	__u32 technique;

	switch (req) {
	case 16: // PTRACE_ATTACH
		technique = T_PTRACE_ATTACH;
		break;
	case 0x4206: // PTRACE_SEIZE
		technique = T_PTRACE_SEIZE;
		break;
	case 1: // PTRACE_PEEKTEXT
	case 2: // PTRACE_PEEKDATA
	case 3: // PTRACE_PEEKUSR
		technique = T_PTRACE_PEEK;
		break;
	case 4: // PTRACE_POKETEXT
	case 5: // PTRACE_POKEDATA
	case 6: // PTRACE_POKEUSR
		technique = T_PTRACE_POKE;
		break;
	default:
		return 0;
	}
	struct protected_proc *p;
	struct scratch *s = event_on((__u32)ctx->args[1], technique, ctx->nr, &p);
	if (!s)
		return 0;
	struct event *e = &s->e;
	e->arg = req;
	if (req == 1 || req == 2 || req == 4 || req == 5)
		add_range(e, p, ctx->args[2], sizeof(long), 1);
	stash(e);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_ptrace")
int ptrace_exit(struct exit_ctx *ctx) { return exit_send(ctx); }

#include "opens.h"

// Opens have no entry program: see open_args.
SEC("tracepoint/syscalls/sys_exit_openat")
int openat_exit(struct exit_ctx *ctx) { return open_exit(ctx->ret, ctx->nr, 0); }

SEC("tracepoint/syscalls/sys_exit_openat2")
int openat2_exit(struct exit_ctx *ctx) { return open_exit(ctx->ret, ctx->nr, F_OPENAT2); }

// open(2) and creat(2) reach the same files as openat with AT_FDCWD; x86-64
// has them (arm64 does not, and the loader leaves them out there).
SEC("tracepoint/syscalls/sys_exit_open")
int open_legacy_exit(struct exit_ctx *ctx) { return open_exit(ctx->ret, ctx->nr, F_OPEN); }

SEC("tracepoint/syscalls/sys_exit_creat")
int creat_exit(struct exit_ctx *ctx) { return open_exit(ctx->ret, ctx->nr, F_CREAT); }

// io_uring opens never pass a syscall tracepoint: the ring's worker opens
// the file inside io_uring_enter, or in an io-wq thread of the submitter.
// Every request's completion passes io_uring:io_uring_complete, in a thread
// of the submitting process (the submitter, an io-wq worker or the SQPOLL
// thread, all of which share its fd table), and for an open res is the new
// fd. So the opened file is judged as a successful openat's is; a failed
// ring open is not reported (its path is in kernel memory, released by
// then), nor one that installs a fixed file (res is then 0, not an fd).
struct io_uring_complete_ctx {
	__u64 common;
	void *ctx;
	void *req;
	__u64 user_data;
	__s32 res;
	__u32 cflags;
	__u64 extra1;
	__u64 extra2;
};

SEC("tracepoint/io_uring/io_uring_complete")
int ring_complete(struct io_uring_complete_ctx *ctx)
{
	struct io_kiocb *req = ctx->req;
	struct file *f;

	if (ctx->res < 0 || !req)
		return 0;
	__u8 op = BPF_CORE_READ(req, opcode);
	if (op != bpf_core_enum_value(enum io_uring_op, IORING_OP_OPENAT) &&
	    op != bpf_core_enum_value(enum io_uring_op, IORING_OP_OPENAT2))
		return 0;
	if (!may_matter(ctx->res, F_IO_URING, &f) || !f)
		return 0;
	return report_open(f, F_IO_URING, ctx->res, -1);
}

// 32-bit syscalls (int 0x80, which any 64-bit process may issue) skip the
// per-syscall tracepoints, so their opens are caught on raw_syscalls:
// sys_exit, which every syscall of every task passes. The program leaves at
// once unless the task is in a compat syscall (x86's TS_COMPAT); ia32
// numbers: open 5, creat 8, openat 295, openat2 437; and bpf 357, whose
// descriptors by ID bpf_fd_exit judges.
struct raw_exit_ctx {
	__u64 common;
	long id;
	long ret;
};

// own: the monitor's own BPF maps, programs and links, keyed by the bpf(2)
// command that takes a descriptor of one by ID, << 32, | its ID; the value
// is the pid of the process that holds them. The loader fills it.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u64);
	__type(value, __u32);
} own SEC(".maps");

// prog_load_exit reports a BPF program that another process loaded: once
// attached it runs in whichever task reaches its hook, a key holder
// included, and may read that task's memory (bpf_probe_read_user) from
// inside the kernel, by no route the rest of the monitor sees. Every type
// can: the kernel gives bpf_probe_read_user to all of them when the loader
// has CAP_PERFMON (bpf_base_func_proto; a socket filter and a cgroup_skb
// program using it load on 6.18), and a cgroup_skb egress program on the
// key holder's cgroup runs in the key holder's context at each send. Its
// type is read from the loaded program, not the caller's bpf_attr.
static __always_inline int prog_load_exit(struct bpf_prog *prog, long ret, __s32 nr, int compat)
{
	struct scratch *s = new_event(T_BPF_PROG_LOAD, nr);
	if (!s)
		return 0;
	s->e.arg = BPF_CORE_READ(prog, type);
	s->e.result = ret;
	if (compat)
		s->e.flags |= F_COMPAT;
	send(&s->e);
	return 0;
}

// bpf_fd_exit reports another process taking a descriptor of one of the
// monitor's objects by ID: with a map's it can delete a protected process
// from prot and so blind every program here, without unloading or killing
// anything. The object is judged from the descriptor the kernel handed out
// (its file's private_data), not from the caller's bpf_attr, which another
// thread could rewrite between the kernel's copy and any read of ours.
static __always_inline int bpf_fd_exit(long ret, __s32 nr, int compat)
{
	if (ret < 0)
		return 0;
	__u64 a[6];
	syscall_args(a, compat);
	__u64 cmd = (__u32)a[0];
	if (cmd != BPF_MAP_GET_FD_BY_ID && cmd != BPF_PROG_GET_FD_BY_ID && cmd != BPF_LINK_GET_FD_BY_ID && cmd != BPF_PROG_LOAD)
		return 0;
	__u32 me = bpf_get_current_pid_tgid() >> 32;
	if (bpf_map_lookup_elem(&prot, &me))
		return 0; // the monitor itself, or a key holder it protects
	struct file *f = file_of((int)ret);
	if (!f)
		return 0;
	void *obj = BPF_CORE_READ(f, private_data);
	if (cmd == BPF_PROG_LOAD)
		return prog_load_exit(obj, ret, nr, compat);
	__u32 id;
	if (cmd == BPF_MAP_GET_FD_BY_ID)
		id = BPF_CORE_READ((struct bpf_map *)obj, id);
	else if (cmd == BPF_PROG_GET_FD_BY_ID)
		id = BPF_CORE_READ((struct bpf_prog *)obj, aux, id);
	else
		id = BPF_CORE_READ((struct bpf_link *)obj, id);
	__u64 key = cmd << 32 | id;
	__u32 *owner = bpf_map_lookup_elem(&own, &key);
	if (!owner)
		return 0;
	__u32 tgid = *owner;
	struct scratch *s = new_event(T_BPF_FD, nr);
	if (!s)
		return 0;
	s->e.target = tgid;
	s->e.target_tgid = tgid;
	s->e.arg = key;
	s->e.result = ret;
	if (compat)
		s->e.flags |= F_COMPAT;
	send(&s->e);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_bpf")
int bpf_exit(struct exit_ctx *ctx) { return bpf_fd_exit(ctx->ret, ctx->nr, 0); }

SEC("tracepoint/raw_syscalls/sys_exit")
int compat_exit(struct raw_exit_ctx *ctx)
{
	if (!in_compat_syscall())
		return 0;
	switch (ctx->id) {
	case 357: // bpf
		return bpf_fd_exit(ctx->ret, ctx->id, 1);
	case 5:
		return open_exit(ctx->ret, ctx->id, F_COMPAT | F_OPEN);
	case 8:
		return open_exit(ctx->ret, ctx->id, F_COMPAT | F_CREAT);
	case 295:
		return open_exit(ctx->ret, ctx->id, F_COMPAT);
	case 437:
		return open_exit(ctx->ret, ctx->id, F_COMPAT | F_OPENAT2);
	}
	return 0;
}

#define PIDFS_MAGIC 0x50494446

SEC("tracepoint/syscalls/sys_enter_pidfd_getfd")
int pidfd_getfd_enter(struct enter_ctx *ctx)
{
	struct file *f = file_of((int)ctx->args[0]);
	if (!f)
		return 0;
	struct inode *ino = BPF_CORE_READ(f, f_inode);
	if (BPF_CORE_READ(ino, i_sb, s_magic) != PIDFS_MAGIC)
		return 0;
	// pidfs keeps the struct pid in the inode (one inode per pid).
	__u32 tgid = tgid_of_pid((struct pid *)BPF_CORE_READ(ino, i_private));
	if (!tgid || !bpf_map_lookup_elem(&prot, &tgid))
		return 0;
	if ((bpf_get_current_pid_tgid() >> 32) == tgid)
		return 0;
	struct scratch *s = new_event(T_PIDFD_GETFD, ctx->nr);
	if (!s)
		return 0;
	s->e.target = tgid;
	s->e.target_tgid = tgid;
	s->e.arg = ctx->args[1];
	stash(&s->e);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_pidfd_getfd")
int pidfd_getfd_exit(struct exit_ctx *ctx) { return exit_send(ctx); }

SEC("tracepoint/syscalls/sys_enter_perf_event_open")
int perf_enter(struct enter_ctx *ctx)
{
	int pid = (int)ctx->args[1];
	struct protected_proc *p;
	struct scratch *s;

	if (ctx->args[4] & PERF_FLAG_PID_CGROUP || pid == -1) {
		// A cgroup's events (pid is a cgroup fd) or a CPU's (pid -1) sample
		// whichever task runs there, protected ones included: no target.
		// A protected process's own are not reported: the monitor attaches
		// its tracepoints this way (it protects itself first).
		__u32 me = bpf_get_current_pid_tgid() >> 32;
		if (bpf_map_lookup_elem(&prot, &me))
			return 0;
		s = new_event(T_PERF_EVENT_OPEN, ctx->nr);
		if (!s)
			return 0;
		s->e.flags |= pid == -1 && !(ctx->args[4] & PERF_FLAG_PID_CGROUP) ? F_PERF_CPU : F_PERF_CGROUP;
	} else {
		if (pid <= 0)
			return 0;
		s = event_on(pid, T_PERF_EVENT_OPEN, ctx->nr, &p);
		if (!s)
			return 0;
	}
	// attr: type (u32) first, sample_type at byte 24, stable uapi.
	__u32 type = 0;
	bpf_probe_read_user(&type, sizeof(type), (void *)ctx->args[0]);
	s->e.arg = type;
	bpf_probe_read_user(&s->e.sample_type, sizeof(s->e.sample_type), (void *)ctx->args[0] + 24);
	stash(&s->e);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_perf_event_open")
int perf_exit(struct exit_ctx *ctx) { return exit_send(ctx); }

// Threads of a protected process join `targets` as they are created, and
// leave it as they exit; the whole entry goes when the last thread does, so
// that a recycled pid is never mistaken for the key holder.
struct newtask_ctx {
	__u64 common;
	__s32 pid;
	char comm[16];
	__u32 pad;
	__u64 clone_flags;
};

SEC("tracepoint/task/task_newtask")
int newtask(struct newtask_ctx *ctx)
{
	if (!(ctx->clone_flags & CLONE_THREAD))
		return 0;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!bpf_map_lookup_elem(&prot, &tgid))
		return 0;
	__u32 tid = ctx->pid;
	bpf_map_update_elem(&targets, &tid, &tgid, BPF_ANY);
	return 0;
}

// Only the fields every kernel has: group_dead came in Linux 6.16, and a
// program that reads past a tracepoint's fields may not attach to it (EACCES).
struct exit_task_ctx {
	__u64 common;
	char comm[16];
	__s32 pid;
	__s32 prio;
};

SEC("tracepoint/sched/sched_process_exit")
int task_exit(struct exit_task_ctx *ctx)
{
	__u32 tid = ctx->pid;
	__u32 *t = bpf_map_lookup_elem(&targets, &tid);
	if (!t)
		return 0;
	__u32 tgid = *t;
	if (tid != tgid)
		bpf_map_delete_elem(&targets, &tid);
	// do_exit counts the exiting thread out of signal->live before this
	// tracepoint: at zero the whole process is going.
	if (BPF_CORE_READ(bpf_get_current_task_btf(), signal, live.counter) == 0) {
		bpf_map_delete_elem(&targets, &tgid);
		bpf_map_delete_elem(&prot, &tgid);
	}
	return 0;
}
