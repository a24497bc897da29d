// SPDX-License-Identifier: GPL-2.0
// Enforcement: BPF LSM programs that deny what monitor.c only reports. They
// load only where the kernel runs the bpf LSM (lsm=...,bpf); the loader
// reports detect-only mode, with the kernel's reason, everywhere else.
// Where they run, file_open also reports every open the monitor cares
// about, and the loader detaches monitor.c's open tracepoints: every route
// to a file (open, openat, openat2, creat, io_uring, 32-bit syscalls,
// kernel-internal opens on a task's behalf) passes this hook.
#include "event.h"

char LICENSE[] SEC("license") = "GPL";

// refuse records the refusal for monitor.c (see denials in common.h) and
// returns it. The kernel may hand the caller another errno than ours (EACCES
// for /proc/<pid>/mem), so the record, not the errno, says who refused.
static __always_inline int refuse(void)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct denial d = {.nr = syscall_nr()};

	bpf_map_update_elem(&denials, &id, &d, BPF_ANY);
	return -EPERM;
}

static __always_inline int allowed(void)
{
	__u32 me = bpf_get_current_pid_tgid() >> 32;
	return bpf_map_lookup_elem(&allow, &me) != 0;
}

// ptrace_access_check gates ptrace attach and, in ATTACH mode, every other
// way into another process's memory: /proc/<pid>/mem (mem_open),
// process_vm_readv/writev and pidfd_getfd. It runs after the kernel's own
// uid and dumpable checks, so a non-zero ret from those stands.
SEC("lsm/ptrace_access_check")
int BPF_PROG(deny_ptrace, struct task_struct *child, unsigned int mode, int ret)
{
	if (ret)
		return ret;
	if (!(mode & PTRACE_MODE_ATTACH))
		return 0;
	__u32 tgid = BPF_CORE_READ(child, tgid);
	if (!bpf_map_lookup_elem(&prot, &tgid))
		return 0;
	if ((bpf_get_current_pid_tgid() >> 32) == tgid || allowed())
		return 0;
	return refuse();
}

// open_route sets the flags that say how the current task reached
// file_open: the syscall it is in (x86-64 and ia32 numbers; other
// architectures report every open as openat, untested), or an io_uring
// worker (PF_IO_WORKER), which opens on a ring's behalf outside any
// syscall.
#define PF_IO_WORKER 0x00000010
#define TS_COMPAT 0x0002
static __always_inline __u32 open_route(__s32 nr)
{
	struct task_struct *t = bpf_get_current_task_btf();
	struct pt_regs *regs = current_regs();
	__u32 f = 0;

	if (t->flags & PF_IO_WORKER)
		return F_IO_URING;
	if (!bpf_core_field_exists(regs->orig_ax))
		return 0;
	if (bpf_core_field_exists(t->thread_info.status) && (t->thread_info.status & TS_COMPAT)) {
		f = F_COMPAT;
		if (nr == 5)
			return f | F_OPEN;
		if (nr == 8)
			return f | F_CREAT;
		if (nr == 437)
			return f | F_OPENAT2;
		return f;
	}
	switch (nr) {
	case 2:
		return F_OPEN;
	case 85:
		return F_CREAT;
	case 437:
		return F_OPENAT2;
	case 426: // io_uring_enter: the ring's open ran inline
		return F_IO_URING;
	}
	return 0;
}

// report_open sends the event for an open file_open judged: kind and tgid
// from classify_file, denied whether this program refuses it. The result
// is the LSM's verdict (-EPERM, or 0: the open went on to the file's own
// checks, whose outcome this hook cannot see); arg is the file's f_flags.
static __always_inline void report_open(struct file *file, int kind, __u32 tgid, int denied)
{
	__s32 nr = syscall_nr();

	__u32 technique;

	switch (kind) {
	case FK_MEM:
		technique = T_PROC_MEM;
		break;
	case FK_ENVIRON:
		technique = T_PROC_ENVIRON;
		break;
	case FK_MAPS:
		technique = T_PROC_MAPS;
		break;
	case FK_KCORE:
		technique = T_KCORE;
		break;
	case FK_DEVMEM:
		technique = T_DEVMEM;
		break;
	default:
		return;
	}
	struct scratch *s = new_event(technique, nr);
	if (!s)
		return;
	struct event *e = &s->e;
	e->flags = F_LSM | F_RESOLVED | open_route(nr);
	e->arg = BPF_CORE_READ(file, f_flags);
	e->target = tgid;
	e->target_tgid = tgid;
	if (tgid) {
		struct protected_proc *p = bpf_map_lookup_elem(&prot, &tgid);
		if (p && p->whole)
			e->flags |= F_WHOLE;
	}
	if (kind == FK_MEM || kind == FK_KCORE || kind == FK_DEVMEM)
		e->flags |= F_OVERLAP;
	if (denied) {
		e->flags |= F_DENIED;
		e->result = -EPERM;
	}
	send(e);
}

// file_open judges every open in the system by the opened file (as the
// open tracepoints do) and reports those of a protected process's mem,
// environ and maps and of /proc/kcore and /dev/mem. It denies kcore and
// /dev/mem, which expose all of memory whatever pid holds the keys, and a
// protected process's mem, which ptrace_access_check would refuse a moment
// later (mem_open's mm_access): refusing here, the program knows the
// outcome it reports.
SEC("lsm/file_open")
int BPF_PROG(deny_open, struct file *file, int ret)
{
	__u32 tgid;
	int kind, deny = 0;

	if (ret)
		return ret;
	kind = classify_file(file, &tgid);
	if (kind == FK_NONE)
		return 0;
	if (tgid && (tgid == (bpf_get_current_pid_tgid() >> 32) || !bpf_map_lookup_elem(&prot, &tgid)))
		return 0;
	if (kind == FK_MEM || kind == FK_KCORE || kind == FK_DEVMEM)
		deny = !allowed();
	report_open(file, kind, tgid, deny);
	return deny ? -EPERM : 0;
}
