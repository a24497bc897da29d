// SPDX-License-Identifier: GPL-2.0
// Detection: syscall tracepoints that see every way another process can read
// (or write) a protected process's memory. Each program looks the named pid up
// in `targets` first, so other processes' syscalls cost one hash lookup; opens
// are the exception (the pid is inside the path): they are seen at exit only,
// and filtered on the opened file's filesystem, or for failed opens on the
// path's first bytes. Other entries build the event in `pending`; their exit
// adds the result and sends it.
#include "common.h"

char LICENSE[] SEC("license") = "GPL";

#define MAX_IOV 16
#define AT_FDCWD -100
#define CLONE_THREAD 0x00010000
#define PERF_FLAG_PID_CGROUP (1U << 2)

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
};

enum flags {
	F_OVERLAP = 1,   // the request touches key pages
	F_TRUNCATED = 2, // more remote iovecs than the program checks
	F_WHOLE = 4,     // the whole address space is protected
	F_RESOLVED = 8,  // an open's target was read from the opened inode
	F_OPENAT2 = 16,
	F_DENIED = 32,   // an enforce.c program refused this syscall (denials)
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
	char comm[16];
	char exe[EXE_LEN];
	char path[PATH_LEN];
};
const struct event *unused_event __attribute__((unused));

struct iovec_u {
	__u64 base;
	__u64 len;
};

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

// pending holds an event between syscall entry and exit, per thread. LRU, so
// that an exit never seen (a tracepoint attached mid-syscall) cannot leak.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct event);
} pending SEC(".maps");

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

// take_denial consumes this thread's refusal record, if any, and marks e
// denied when the refusal was of the syscall now exiting, which then failed.
// Only programs about to send an event call it: the lookup stays off the
// path every open in the system takes.
static __always_inline void take_denial(struct event *e, __s32 nr, long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct denial *d = bpf_map_lookup_elem(&denials, &id);
	if (!d)
		return;
	if (d->nr == nr && ret < 0)
		e->flags |= F_DENIED;
	bpf_map_delete_elem(&denials, &id);
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
		take_denial(e, ctx->nr, ctx->ret);
		send(e);
	}
	unstash(id);
	return 0;
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
	if (n && bpf_probe_read_user(s->iov, n * sizeof(struct iovec_u), (void *)ctx->args[3]) == 0) {
		// bpf_loop, so that the verifier checks one iovec against the
		// ranges once rather than every iovec against every range.
		struct range_ctx rc = {.e = e, .p = p, .iov = s->iov};
		bpf_loop(n, range_cb, &rc, 0);
	}
	stash(e);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_process_vm_readv")
int vm_readv_enter(struct enter_ctx *ctx) { return vm_enter(ctx, T_VM_READV); }

SEC("tracepoint/syscalls/sys_exit_process_vm_readv")
int vm_readv_exit(struct exit_ctx *ctx) { return exit_send(ctx); }

SEC("tracepoint/syscalls/sys_enter_process_vm_writev")
int vm_writev_enter(struct enter_ctx *ctx) { return vm_enter(ctx, T_VM_WRITEV); }

SEC("tracepoint/syscalls/sys_exit_process_vm_writev")
int vm_writev_exit(struct exit_ctx *ctx) { return exit_send(ctx); }

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

// bpf_rdonly_cast is a kfunc of Linux 6.2+. It is weak so that the programs
// still load without it (Debian 12's 6.1): the loader then turns its calls
// into poisoned ones, which must be dead code. have_rdonly_cast, set by the
// loader from the kernel's BTF, makes them so; bpf_ksym_exists would not do,
// since kernels before 6.4 refuse an ld_imm64 of a kfunc's address.
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym __weak;
const volatile __u8 have_rdonly_cast = 0;

// file_of returns the struct file behind the current task's fd. With
// bpf_rdonly_cast the result is a BTF pointer, read through with inlined
// loads rather than bpf_probe_read_kernel calls, since this runs for every
// relative open in the system; without it the result is a plain address,
// which callers must read with BPF_CORE_READ (see file_is_candidate).
static __always_inline struct file *file_of(int fd)
{
	struct task_struct *t = bpf_get_current_task_btf();
	struct fdtable *fdt = t->files->fdt;
	struct file **fds;
	struct file *f = 0;

	if (fd < 0 || !fdt || (unsigned int)fd >= fdt->max_fds)
		return 0;
	// Cast to untrusted memory (Linux 6.17+), the fd array is read with a
	// plain load at a variable index: a bpf_probe_read_kernel call cost
	// ~70 ns a run here, more than the rest of the exit program.
	if (have_rdonly_cast && bpf_core_enum_value_exists(enum bpf_features, BPF_FEAT_RDONLY_CAST_TO_VOID)) {
		fds = bpf_rdonly_cast(fdt->fd, 0);
		f = fds[fd & 0xfffffff];
	} else {
		fds = fdt->fd;
		bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]);
	}
	if (!f)
		return 0;
	if (!have_rdonly_cast)
		return f;
	return bpf_rdonly_cast(f, bpf_core_type_id_kernel(struct file));
}

// file_dentry_of returns the dentry a struct file from file_of names.
static __always_inline struct dentry *file_dentry_of(struct file *f)
{
	if (!have_rdonly_cast)
		return BPF_CORE_READ(f, f_path.dentry);
	return f->f_path.dentry;
}

// base_on_procfs reports whether the directory an open is relative to (dfd, or
// the working directory) is on procfs.
static __always_inline int base_on_procfs(int dfd, struct dentry **base)
{
	struct dentry *d;
	unsigned long magic;

	if (dfd == AT_FDCWD) {
		d = bpf_get_current_task_btf()->fs->pwd.dentry;
		if (!d)
			return 0;
		magic = d->d_sb->s_magic;
	} else {
		struct file *f = file_of(dfd);
		if (!f)
			return 0;
		d = file_dentry_of(f);
		if (!d)
			return 0;
		// A dentry read through file_of's fallback is a plain address.
		if (have_rdonly_cast)
			magic = d->d_sb->s_magic;
		else
			magic = BPF_CORE_READ(d, d_sb, s_magic);
	}
	if (magic != PROC_SUPER_MAGIC)
		return 0;
	*base = d;
	return 1;
}

// tail_is reports whether the path (len bytes, no NUL) ends with the
// component suf: "…/suf", or suf alone.
static __always_inline int tail_is(const char *p, int len, const char *suf, int sl)
{
	if (len < sl || len >= PATH_LEN)
		return 0;
	for (int k = 0; k < sl; k++)
		if (p[(len - sl + k) & (PATH_LEN - 1)] != suf[k])
			return 0;
	return len == sl || p[(len - sl - 1) & (PATH_LEN - 1)] == '/';
}

// guess_open works out, from the path alone, what an open that fails was
// after; an open that succeeds is classified from its inode instead. len is
// the path's length. It is written without loops that carry a position, so
// that the verifier's work stays small.
static __always_inline void guess_open(struct event *e, int len, struct dentry *base)
{
	__u32 pid = 0;

	if (e->path[0] == '/') {
		if (name_is(e->path, "/dev/mem", 9)) {
			e->technique = T_DEVMEM;
			return;
		}
		if (name_is(e->path, "/proc/kcore", 12)) {
			e->technique = T_KCORE;
			return;
		}
		// /proc/<pid>/...: the first component names the process.
		for (int i = 0; i < 10; i++) {
			char c = e->path[6 + i];
			if (c < '0' || c > '9')
				break;
			pid = pid * 10 + (c - '0');
		}
	} else if (base) {
		struct inode *ino = BPF_CORE_READ(base, d_inode);
		struct proc_inode *pi = container_of(ino, struct proc_inode, vfs_inode);
		pid = tgid_of_pid(BPF_CORE_READ(pi, pid));
	}
	if (tail_is(e->path, len, "mem", 3))
		e->technique = T_PROC_MEM;
	else if (tail_is(e->path, len, "environ", 7))
		e->technique = T_PROC_ENVIRON;
	else if (tail_is(e->path, len, "maps", 4))
		e->technique = T_PROC_MAPS;
	else
		return;
	__u32 tgid;
	if (pid && lookup_target(pid, &tgid)) {
		e->target = pid;
		e->target_tgid = tgid;
	}
}

// open_args recovers an open's directory fd, path and flags at its exit from
// the registers the syscall was entered with, so that no program runs at
// openat's entry: that program, and its read of every path in the system
// from user memory, were most of the monitor's cost. The architecture is
// chosen at load time (CO-RE); only x86-64 is tested.
static __always_inline void open_args(__u32 flag, int *dfd, const char **fn, __u64 *flags)
{
	struct pt_regs *regs = current_regs();
	__u64 how;

	if (bpf_core_field_exists(regs->di)) {
		*dfd = (int)regs->di;
		*fn = (const char *)regs->si;
		how = regs->dx;
	} else {
		struct pt_regs___arm64 *r = (void *)regs;
		*dfd = (int)r->orig_x0;
		*fn = (const char *)r->regs[1];
		how = r->regs[2];
	}
	*flags = how;
	if (flag & F_OPENAT2) {
		// openat2's third argument is a struct open_how; flags come first.
		__u64 f = 0;
		bpf_probe_read_user(&f, sizeof(f), (void *)how);
		*flags = f;
	}
}

// file_is_candidate reports whether a file from file_of is a character
// device or on procfs: the only files the monitor looks at further.
static __always_inline int file_is_candidate(struct file *f)
{
	struct inode *ino;

	if (!have_rdonly_cast) {
		ino = BPF_CORE_READ(f, f_inode);
		if (!ino)
			return 0;
		return (BPF_CORE_READ(ino, i_mode) & S_IFMT) == S_IFCHR ||
		       BPF_CORE_READ(ino, i_sb, s_magic) == PROC_SUPER_MAGIC;
	}
	ino = f->f_inode;
	if (!ino)
		return 0;
	return (ino->i_mode & S_IFMT) == S_IFCHR || ino->i_sb->s_magic == PROC_SUPER_MAGIC;
}

// may_matter is the filter every open in the system passes through, so it
// reads as little as it can. A successful open is judged by the file it
// opened (a few loads through BTF pointers): only files on procfs and
// character devices go further. A failed one (nothing was opened, so only
// its path says what it was after) is judged by its path's first 8 bytes:
// an absolute path must start /proc/ or /dev/mem, a relative one must be
// relative to a directory on procfs. *f is the opened file, if any.
static __always_inline int may_matter(long ret, __u32 flag, struct file **f)
{
	*f = 0;
	if (ret >= 0) {
		struct file *file = file_of((int)ret);
		if (!file)
			return 0;
		if (!file_is_candidate(file))
			return 0;
		*f = file;
		return 1;
	}
	int dfd;
	const char *fn;
	__u64 flags;
	char head[8];
	struct dentry *base = 0;

	open_args(flag, &dfd, &fn, &flags);
	// A path of fewer than 8 bytes at the very end of a mapping fails the
	// fixed-size read and is read as a string instead.
	if (bpf_probe_read_user(head, sizeof(head), fn) < 0) {
		__builtin_memset(head, 0, sizeof(head));
		if (bpf_probe_read_user_str(head, sizeof(head), fn) < 0)
			return 0;
	}
	if (head[0] == '/')
		return name_is(head, "/proc/", 6) || name_is(head, "/dev/mem", 8);
	return base_on_procfs(dfd, &base);
}

static __always_inline int open_exit(struct exit_ctx *ctx, __u32 flag)
{
	struct file *f;
	__u32 tgid = 0;
	int kind = FK_NONE;

	if (!may_matter(ctx->ret, flag, &f))
		return 0;
	__u32 me = bpf_get_current_pid_tgid() >> 32;
	if (f) {
		// Classified from the inode, whatever path reached it; files of
		// unprotected processes, and a process's own, stop here.
		kind = classify_file(f, &tgid);
		if (kind == FK_NONE)
			return 0;
		if (tgid && (tgid == me || !bpf_map_lookup_elem(&prot, &tgid)))
			return 0;
	}

	// Rare from here on: an open of a protected process's /proc files, of
	// kcore or /dev/mem, or a failed open whose path looks like one.
	int dfd;
	const char *fn;
	__u64 flags;
	struct dentry *base = 0;

	open_args(flag, &dfd, &fn, &flags);
	struct scratch *s = new_event(0, ctx->nr);
	if (!s)
		return 0;
	struct event *e = &s->e;
	e->flags = flag;
	e->arg = flags;
	e->result = ctx->ret;
	long n = bpf_probe_read_user_str(e->path, sizeof(e->path), fn);
	if (e->path[0] != '/')
		base_on_procfs(dfd, &base);
	// The path names the target as the caller wrote it (a thread id,
	// perhaps), and is all a failed open has.
	guess_open(e, n > 0 ? n - 1 : 0, base);
	if (f) {
		e->flags |= F_RESOLVED;
		switch (kind) {
		case FK_MEM:
			e->technique = T_PROC_MEM;
			break;
		case FK_ENVIRON:
			e->technique = T_PROC_ENVIRON;
			break;
		case FK_MAPS:
			e->technique = T_PROC_MAPS;
			break;
		case FK_KCORE:
			e->technique = T_KCORE;
			break;
		case FK_DEVMEM:
			e->technique = T_DEVMEM;
			break;
		}
		if (tgid) {
			e->target_tgid = tgid;
			if (!e->target)
				e->target = tgid;
		}
	}
	switch (e->technique) {
	case T_PROC_MEM:
	case T_PROC_ENVIRON:
	case T_PROC_MAPS:
		// A process reading its own /proc files is no attack.
		if (!e->target_tgid || e->target_tgid == me)
			return 0;
		struct protected_proc *p = bpf_map_lookup_elem(&prot, &e->target_tgid);
		if (!p)
			return 0;
		if (p->whole)
			e->flags |= F_WHOLE;
		if (e->technique == T_PROC_MEM)
			e->flags |= F_OVERLAP;
		take_denial(e, ctx->nr, ctx->ret);
		send(e);
		break;
	case T_KCORE:
	case T_DEVMEM:
		e->flags |= F_OVERLAP;
		take_denial(e, ctx->nr, ctx->ret);
		send(e);
		break;
	}
	return 0;
}

// Opens have no entry program: see open_args.
SEC("tracepoint/syscalls/sys_exit_openat")
int openat_exit(struct exit_ctx *ctx) { return open_exit(ctx, 0); }

SEC("tracepoint/syscalls/sys_exit_openat2")
int openat2_exit(struct exit_ctx *ctx) { return open_exit(ctx, F_OPENAT2); }

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

	if (pid <= 0 || (ctx->args[4] & PERF_FLAG_PID_CGROUP))
		return 0;
	struct scratch *s = event_on(pid, T_PERF_EVENT_OPEN, ctx->nr, &p);
	if (!s)
		return 0;
	__u32 type = 0;
	bpf_probe_read_user(&type, sizeof(type), (void *)ctx->args[0]);
	s->e.arg = type;
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
