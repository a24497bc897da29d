// SPDX-License-Identifier: GPL-2.0
// Deny mode: BPF LSM programs that report and deny what monitor.c's
// tracepoints only report. They load only where the kernel runs the bpf LSM
// (lsm=...,bpf); the loader reports detect-only mode, with the kernel's
// reason, everywhere else. Where they run, they are the whole monitor: the
// loader attaches none of monitor.c's syscall tracepoints, any one of which
// would put every syscall of every task on the kernel's slow path. Nor do
// they hook a path every open takes (file_open): the trampoline alone cost
// open+close a few per cent in the test VM. Each hook runs on rare paths:
// ptrace_access_check sees ptrace attach, process_vm_readv/writev and
// pidfd_getfd (told apart by the syscall the task is in) and, with
// PTRACE_MODE_FSCREDS, procfs's checks: the open of /proc/PID/mem
// (mem_open), environ and maps (proc_mem_open), by whatever route the open
// came (open, openat, openat2, creat, io_uring, 32-bit syscalls), since
// they all reach mm_access; locked_down sees the opens of /proc/kcore
// (open_kcore) and /dev/mem (open_port); perf_event_open sees
// perf_event_open.
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
	__s32 ptrace, vm_readv, vm_writev, pidfd_getfd, perf_event_open, openat;
};

static __always_inline struct nrs syscall_nrs(int compat)
{
	struct pt_regs *regs = current_regs();

	if (!bpf_core_field_exists(regs->orig_ax))
		return (struct nrs){117, 270, 271, 438, 241, 56};
	if (compat)
		return (struct nrs){26, 347, 348, 438, 336, 295};
	return (struct nrs){101, 310, 311, 438, 298, 257};
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
// Other checks without PTRACE_MODE_FSCREDS (kcmp, get_robust_list, …) send
// nothing; procfs's (FSCREDS) go to report_proc.
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

#define PTRACE_MODE_FSCREDS 0x08
#define PF_IO_WORKER 0x00000010

// open_route sets the flags that say how the current task reached an open:
// the syscall it is in (x86-64 and ia32 numbers; other architectures
// report every open as openat, untested), or an io_uring worker
// (PF_IO_WORKER), which opens on a ring's behalf outside any syscall.
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

// open_flags returns the flags of the open the current task is in, from
// the registers its syscall entered with (route from open_route): open's
// second argument, openat's third, openat2's open_how.flags, creat's
// implied O_CREAT|O_WRONLY|O_TRUNC. An io_uring open's flags sit in the
// ring's request, in kernel memory this hook cannot name: 0.
static __always_inline __u64 open_flags(__u32 route, __s32 nr)
{
	int compat = (route & F_COMPAT) != 0;
	__u64 a[6];

	if (route & F_IO_URING)
		return 0;
	if (route & F_CREAT)
		return O_CREAT_TRUNC_WRONLY;
	syscall_args(a, compat);
	if (route & F_OPEN)
		return a[1];
	if (route & F_OPENAT2) {
		__u64 f = 0;
		bpf_probe_read_user(&f, sizeof(f), (void *)a[2]);
		return f;
	}
	if (nr == syscall_nrs(compat).openat)
		return a[2];
	return 0;
}

// report_file sends the event for an open a hook saw inside the kernel's
// open path: of a protected process's mem, environ or maps (target and
// tgid its thread and process, p its entry) or of /proc/kcore or /dev/mem
// (target 0). nd is the current task's path walk (current->nameidata, set
// by do_filp_open for every route, io_uring's included): its name is the
// kernel's copy of the path as the caller gave it. The route and flags
// come from the syscall the task is in.
static __always_inline void report_file(__u32 technique, __u32 target, __u32 tgid, struct protected_proc *p,
					struct nameidata *nd, int denied)
{
	__s32 nr = syscall_nr();
	__u32 route = open_route(nr);
	struct scratch *s = new_event(technique, nr);

	if (!s)
		return;
	struct event *e = &s->e;
	e->flags = F_LSM | F_RESOLVED | route;
	e->arg = open_flags(route, nr);
	e->target = target;
	e->target_tgid = tgid;
	if (p && p->whole)
		e->flags |= F_WHOLE;
	if (technique == T_PROC_MEM || technique == T_KCORE || technique == T_DEVMEM)
		e->flags |= F_OVERLAP;
	if (nd) {
		struct filename *fn = nd->name;
		if (fn)
			bpf_probe_read_kernel_str(e->path, sizeof(e->path), fn->name);
	}
	if (denied) {
		e->flags |= F_DENIED;
		e->result = -EPERM;
	}
	send(e);
}

// report_proc reports a procfs access check (PTRACE_MODE_FSCREDS) on a
// protected process when it comes from an open of its mem (mem_open,
// ATTACH mode), environ or maps (proc_mem_open, READ mode). The file is
// the one the current path walk stands on: do_open calls vfs_open with
// nd->path, so nd->path.dentry is the file being opened, whatever path,
// symlink or dirfd led there. Other procfs checks (stat, status, stack,
// syscall, readlink of exe, and any check outside an open) send nothing.
static __always_inline void report_proc(struct task_struct *child, __u32 tgid, struct protected_proc *p, int denied)
{
	struct nameidata *nd = bpf_get_current_task_btf()->nameidata;
	char name[8] = {};
	__u32 technique;

	if (!nd)
		return;
	struct dentry *d = nd->path.dentry;
	if (!d || d->d_sb->s_magic != PROC_SUPER_MAGIC)
		return;
	bpf_probe_read_kernel_str(name, sizeof(name), d->d_name.name);
	switch (classify_name(name)) {
	case FK_MEM:
		technique = T_PROC_MEM;
		break;
	case FK_ENVIRON:
		technique = T_PROC_ENVIRON;
		break;
	case FK_MAPS:
		technique = T_PROC_MAPS;
		break;
	default:
		return;
	}
	report_file(technique, child->pid, tgid, p, nd, denied);
}

// ptrace_access_check gates ptrace attach and, in ATTACH mode, every other
// way into another process's memory: /proc/<pid>/mem (mem_open's
// mm_access, with PTRACE_MODE_FSCREDS), process_vm_readv/writev and
// pidfd_getfd. It refuses ATTACH-mode access to a protected process by
// anyone not allowlisted, and reports each attempt by those routes
// (report_access, report_proc), allowlisted ones too, and the READ-mode
// opens of its environ and maps. Every other process's checks (ps reads
// each one's stat this way) leave after one hash lookup. It runs after the
// kernel's own uid and dumpable checks and the LSMs before bpf (yama): an
// attempt they refuse never reaches it, and is not reported in deny mode.
// mm_access turns this hook's EPERM into EACCES for /proc/<pid>/mem.
SEC("lsm/ptrace_access_check")
int BPF_PROG(deny_ptrace, struct task_struct *child, unsigned int mode, int ret)
{
	if (ret)
		return ret;
	__u32 tgid = child->tgid;
	struct protected_proc *p = bpf_map_lookup_elem(&prot, &tgid);
	if (!p)
		return 0;
	if ((bpf_get_current_pid_tgid() >> 32) == tgid)
		return 0;
	int deny = (mode & PTRACE_MODE_ATTACH) && !allowed();
	if (mode & PTRACE_MODE_FSCREDS)
		report_proc(child, tgid, p, deny);
	else if (mode & PTRACE_MODE_ATTACH)
		report_access(tgid, p, deny);
	return deny ? -EPERM : 0;
}

// locked_down reports and refuses the opens of /proc/kcore and /dev/mem,
// which expose all of memory whatever pid holds the keys: open_kcore asks
// security_locked_down(LOCKDOWN_KCORE) (on 6.1 before its CAP_SYS_RAWIO
// check), open_port LOCKDOWN_DEV_MEM (after it). open_port serves
// /dev/port too, which holds no memory: an inode that is a character
// device other than 1:1 is let be. The reasons' values differ between
// kernels, so they are read from the running kernel's BTF (CO-RE). Every
// other lockdown check (bpf, perf, debugfs, …) leaves after two compares.
SEC("lsm/locked_down")
int BPF_PROG(deny_lockdown, enum lockdown_reason what, int ret)
{
	__u32 technique;

	if (ret)
		return ret;
	if (what == bpf_core_enum_value(enum lockdown_reason, LOCKDOWN_KCORE))
		technique = T_KCORE;
	else if (what == bpf_core_enum_value(enum lockdown_reason, LOCKDOWN_DEV_MEM))
		technique = T_DEVMEM;
	else
		return 0;
	struct nameidata *nd = bpf_get_current_task_btf()->nameidata;
	if (technique == T_DEVMEM && nd) {
		struct dentry *d = nd->path.dentry;
		struct inode *ino = d ? d->d_inode : 0;
		if (ino && (ino->i_mode & S_IFMT) == S_IFCHR && ino->i_rdev != DEVMEM_RDEV)
			return 0;
	}
	int deny = !allowed();
	report_file(technique, 0, 0, 0, nd, deny);
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
