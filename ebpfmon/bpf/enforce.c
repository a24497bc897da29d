// SPDX-License-Identifier: GPL-2.0
// Deny mode: BPF LSM programs that report and deny what monitor.c's
// tracepoints only report. They load only where the kernel runs the bpf LSM
// (lsm=...,bpf); the loader reports detect-only mode, with the kernel's
// reason, everywhere else. Where they run, they are the whole monitor: the
// loader attaches none of monitor.c's syscall tracepoints, any one of which
// would put every syscall of every task on the kernel's slow path.
// file_open sees every route to a file (open, openat, openat2, creat,
// io_uring, 32-bit syscalls, kernel-internal opens on a task's behalf);
// ptrace_access_check sees ptrace attach, process_vm_readv/writev and
// pidfd_getfd, told apart by the syscall the task is in; perf_event_open
// sees perf_event_open.
#include "event.h"

char LICENSE[] SEC("license") = "GPL";

static __always_inline int allowed(void)
{
	__u32 me = bpf_get_current_pid_tgid() >> 32;
	return bpf_map_lookup_elem(&allow, &me) != 0;
}

// Syscall numbers of the routes through ptrace_access_check and of
// perf_event_open: x86-64, ia32 (compat), and the generic table of arm64
// and others (untested).
struct nrs {
	__s32 ptrace, vm_readv, vm_writev, pidfd_getfd, perf_event_open;
};

static __always_inline struct nrs syscall_nrs(int compat)
{
	struct pt_regs *regs = current_regs();

	if (!bpf_core_field_exists(regs->orig_ax))
		return (struct nrs){117, 270, 271, 438, 241};
	if (compat)
		return (struct nrs){26, 347, 348, 438, 336};
	return (struct nrs){101, 310, 311, 438, 298};
}

#define PTRACE_ATTACH 16
#define PTRACE_SEIZE 0x4206

// report_access sends the event for an ATTACH-mode access to a protected
// process (tgid, its entry p) that ptrace_access_check saw, when the
// syscall the current task is in is one of the monitor's routes:
// ptrace(PTRACE_ATTACH/SEIZE), process_vm_readv/writev, pidfd_getfd. Their
// arguments are read from the registers the syscall entered with; for
// process_vm_readv/writev that includes the remote iovecs, read from the
// caller's memory here, before any byte is copied: a refused call copies
// nothing, so no later rewrite of the vector by another thread can matter.
// Other ATTACH-mode checks (/proc/PID/mem by an allowlisted pid, which
// file_open reports; /proc/PID/stack, syscall, …) send nothing.
static __always_inline void report_access(__u32 tgid, struct protected_proc *p, int denied)
{
	int compat = in_compat_syscall();
	struct nrs nr = syscall_nrs(compat);
	__s32 cur = syscall_nr();
	__u32 technique;
	__u64 a[6];

	syscall_args(a, compat);
	if (cur == nr.ptrace) {
		if (a[0] == PTRACE_ATTACH)
			technique = T_PTRACE_ATTACH;
		else if (a[0] == PTRACE_SEIZE)
			technique = T_PTRACE_SEIZE;
		else
			return;
	} else if (cur == nr.vm_readv) {
		technique = T_VM_READV;
	} else if (cur == nr.vm_writev) {
		technique = T_VM_WRITEV;
	} else if (cur == nr.pidfd_getfd) {
		technique = T_PIDFD_GETFD;
	} else {
		return;
	}
	struct scratch *s = new_event(technique, cur);
	if (!s)
		return;
	struct event *e = &s->e;
	e->flags = F_LSM;
	if (compat)
		e->flags |= F_COMPAT;
	if (p->whole)
		e->flags |= F_WHOLE;
	e->target_tgid = tgid;
	switch (technique) {
	case T_PTRACE_ATTACH:
	case T_PTRACE_SEIZE:
		e->target = a[1];
		e->arg = a[0];
		break;
	case T_PIDFD_GETFD:
		// The pidfd names a process (pidfd_open takes leaders only).
		e->target = tgid;
		e->arg = a[1];
		break;
	default: {
		// process_vm_readv/writev(pid, lvec, liovcnt, rvec, riovcnt, flags)
		__u64 cnt = a[4];
		__u64 n = cnt;

		e->target = a[0];
		e->niov = cnt > 0xffffffff ? 0xffffffff : cnt;
		if (n > MAX_IOV) {
			n = MAX_IOV;
			e->flags |= F_TRUNCATED;
		}
		if (n && !judge_iov(s, e, p, (const void *)a[3], n, compat))
			e->flags |= F_IOV_UNREAD;
	}
	}
	if (denied) {
		e->flags |= F_DENIED;
		e->result = -EPERM;
	}
	send(e);
}

// ptrace_access_check gates ptrace attach and, in ATTACH mode, every other
// way into another process's memory: /proc/<pid>/mem (mem_open),
// process_vm_readv/writev and pidfd_getfd. It reports each attempt on a
// protected process (report_access), allowlisted ones too, and refuses
// those not allowlisted. It runs after the kernel's own uid and dumpable
// checks and the LSMs before bpf (yama): an attempt they refuse never
// reaches it, and is not reported in deny mode.
SEC("lsm/ptrace_access_check")
int BPF_PROG(deny_ptrace, struct task_struct *child, unsigned int mode, int ret)
{
	if (ret)
		return ret;
	if (!(mode & PTRACE_MODE_ATTACH))
		return 0;
	__u32 tgid = child->tgid;
	struct protected_proc *p = bpf_map_lookup_elem(&prot, &tgid);
	if (!p)
		return 0;
	if ((bpf_get_current_pid_tgid() >> 32) == tgid)
		return 0;
	int deny = !allowed();
	report_access(tgid, p, deny);
	return deny ? -EPERM : 0;
}

#define PERF_SECURITY_OPEN 0
#define PERF_FLAG_PID_CGROUP (1U << 2)

// perf_event_open reports what the syscall tracepoints report in detect
// mode: events on a protected process (pid), and events on a CPU (pid -1)
// or a cgroup, which sample whatever task runs there. The hook runs once
// per syscall with PERF_SECURITY_OPEN, after the kernel copied attr (so
// type and sample_type are the kernel's own copy); pid and flags come from
// the syscall's registers. It refuses nothing (READ-mode access, as ps's),
// so result is 0: the open went on to the kernel's own checks.
SEC("lsm/perf_event_open")
int BPF_PROG(report_perf, struct perf_event_attr *attr, int type, int ret)
{
	if (ret || type != PERF_SECURITY_OPEN)
		return ret;
	int compat = in_compat_syscall();
	__s32 nr = syscall_nr();
	if (nr != syscall_nrs(compat).perf_event_open)
		return 0;
	__u64 a[6];
	syscall_args(a, compat);
	// perf_event_open(attr, pid, cpu, group_fd, flags)
	int pid = (int)a[1];
	__u64 flags = a[4];
	struct protected_proc *p;
	struct scratch *s;

	if (flags & PERF_FLAG_PID_CGROUP || pid == -1) {
		// A protected process's own are not reported: the monitor
		// attaches its tracepoints this way.
		__u32 me = bpf_get_current_pid_tgid() >> 32;
		if (bpf_map_lookup_elem(&prot, &me))
			return 0;
		s = new_event(T_PERF_EVENT_OPEN, nr);
		if (!s)
			return 0;
		s->e.flags |= pid == -1 && !(flags & PERF_FLAG_PID_CGROUP) ? F_PERF_CPU : F_PERF_CGROUP;
	} else {
		if (pid <= 0)
			return 0;
		s = event_on(pid, T_PERF_EVENT_OPEN, nr, &p);
		if (!s)
			return 0;
	}
	s->e.flags |= F_LSM;
	if (compat)
		s->e.flags |= F_COMPAT;
	s->e.arg = attr->type;
	s->e.sample_type = attr->sample_type;
	send(&s->e);
	return 0;
}

// open_route sets the flags that say how the current task reached
// file_open: the syscall it is in (x86-64 and ia32 numbers; other
// architectures report every open as openat, untested), or an io_uring
// worker (PF_IO_WORKER), which opens on a ring's behalf outside any
// syscall.
#define PF_IO_WORKER 0x00000010
static __always_inline __u32 open_route(__s32 nr)
{
	struct task_struct *t = bpf_get_current_task_btf();
	struct pt_regs *regs = current_regs();
	__u32 f = 0;

	if (t->flags & PF_IO_WORKER)
		return F_IO_URING;
	if (!bpf_core_field_exists(regs->orig_ax))
		return 0;
	if (in_compat_syscall()) {
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
// outcome it reports. file is a BTF pointer: the filter every open passes
// reads it with plain loads; classify_file's bpf_probe_read_kernel calls
// (a few hundred ns under the test VM's emulation) are left to the rare
// file on procfs or a character device.
SEC("lsm/file_open")
int BPF_PROG(deny_open, struct file *file, int ret)
{
	__u32 tgid;
	int kind, deny = 0;

	if (ret)
		return ret;
	if (!inode_is_candidate(file->f_inode))
		return 0;
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
