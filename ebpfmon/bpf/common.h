// SPDX-License-Identifier: GPL-2.0
// Maps and types shared by monitor.c (syscall tracepoints, detect mode) and
// enforce.c (BPF LSM, deny mode). The loader creates the maps once, from the
// monitor object, and hands them to the enforce object, so both programs see
// the same protected set and send their events into the same ring buffer.
#ifndef KEYGATE_COMMON_H
#define KEYGATE_COMMON_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#define MAX_RANGES 64
#define PATH_LEN 64
#define EXE_LEN 32

#define PROC_SUPER_MAGIC 0x9fa0
#define S_IFMT 00170000
#define S_IFCHR 0020000
// /dev/mem is the character device 1:1; the kernel encodes dev_t as major<<20|minor.
#define DEVMEM_RDEV ((1u << 20) | 1u)
#define PTRACE_MODE_ATTACH 0x02
// creat(2) is open(path, O_CREAT|O_WRONLY|O_TRUNC, mode).
#define O_CREAT_TRUNC_WRONLY 01101
#define EPERM 1

// One protected process: its key ranges, [start, end). whole=1 means the
// whole address space counts as key pages (no ranges were registered).
struct key_range {
	__u64 start;
	__u64 end;
};
struct protected_proc {
	__u32 n;
	__u32 whole;
	struct key_range r[MAX_RANGES];
};

// prot: tgid -> ranges. Every program looks here (through targets) first, so
// that other processes' syscalls leave after one hash lookup.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, struct protected_proc);
} prot SEC(".maps");

// targets: any tid of a protected process -> its tgid. Syscalls name a tid
// as readily as a tgid (process_vm_readv, ptrace, /proc/<pid>/task/<tid>).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
} targets SEC(".maps");

// allow: accessor tgids the LSM lets through (the key holder's own helpers).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u8);
} allow SEC(".maps");

// arm64's pt_regs, for CO-RE: the first argument register is overwritten
// by the return value, and its value at entry kept in orig_x0; the syscall
// number is syscallno (x86-64's is orig_ax).
struct pt_regs___arm64 {
	__u64 regs[31];
	__u64 orig_x0;
	__s32 syscallno;
} __attribute__((preserve_access_index));

// current_regs returns the registers the current task entered the kernel
// with.
static __always_inline struct pt_regs *current_regs(void)
{
	return (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
}

// syscall_nr returns the number of the syscall the current task is in, as
// the syscall tracepoints report it. The architecture is chosen at load time
// (CO-RE); only x86-64 is tested.
static __always_inline __s32 syscall_nr(void)
{
	struct pt_regs *regs = current_regs();

	if (bpf_core_field_exists(regs->orig_ax))
		return (__s32)regs->orig_ax;
	return ((struct pt_regs___arm64 *)(void *)regs)->syscallno;
}

// in_compat_syscall reports whether the current task is in a 32-bit
// syscall (x86's TS_COMPAT: int 0x80 from any process); never elsewhere.
#define TS_COMPAT 0x0002
static __always_inline int in_compat_syscall(void)
{
	struct task_struct *t = bpf_get_current_task_btf();

	if (!bpf_core_field_exists(t->thread_info.status))
		return 0;
	return (t->thread_info.status & TS_COMPAT) != 0;
}

// syscall_args reads the six argument registers of the syscall the
// current task is in, from the registers it entered the kernel with, which
// the kernel leaves alone until the syscall returns: x86-64's di, si, dx,
// r10, r8, r9; with compat, ia32's ebx, ecx, edx, esi, edi, ebp
// (zero-extended); arm64's orig_x0, x1…x5 (untested). The architecture is
// chosen at load time (CO-RE).
static __always_inline void syscall_args(__u64 a[6], int compat)
{
	struct pt_regs *regs = current_regs();

	if (bpf_core_field_exists(regs->di)) {
		if (compat) {
			a[0] = (__u32)regs->bx;
			a[1] = (__u32)regs->cx;
			a[2] = (__u32)regs->dx;
			a[3] = (__u32)regs->si;
			a[4] = (__u32)regs->di;
			a[5] = (__u32)regs->bp;
		} else {
			a[0] = regs->di;
			a[1] = regs->si;
			a[2] = regs->dx;
			a[3] = regs->r10;
			a[4] = regs->r8;
			a[5] = regs->r9;
		}
		return;
	}
	struct pt_regs___arm64 *r = (void *)regs;
	a[0] = r->orig_x0;
	a[1] = r->regs[1];
	a[2] = r->regs[2];
	a[3] = r->regs[3];
	a[4] = r->regs[4];
	a[5] = r->regs[5];
}

static __always_inline struct protected_proc *lookup_target(__u32 pid, __u32 *tgid)
{
	__u32 *t = bpf_map_lookup_elem(&targets, &pid);
	if (!t)
		return 0;
	*tgid = *t;
	return bpf_map_lookup_elem(&prot, t);
}

// tgid_of_pid maps a struct pid (a thread's) to its thread group's id.
static __always_inline __u32 tgid_of_pid(struct pid *p)
{
	struct hlist_node *first;
	struct task_struct *t;

	if (!p)
		return 0;
	first = BPF_CORE_READ(p, tasks[PIDTYPE_PID].first);
	if (!first)
		return 0;
	t = (void *)first - bpf_core_field_offset(struct task_struct, pid_links);
	return BPF_CORE_READ(t, tgid);
}

// Kinds of file an open can reach, as classified from the opened inode.
enum file_kind {
	FK_NONE = 0,
	FK_MEM = 1,
	FK_ENVIRON = 2,
	FK_MAPS = 3,
	FK_KCORE = 4,
	FK_DEVMEM = 5,
};

static __always_inline int name_is(const char *n, const char *want, int len)
{
	for (int i = 0; i < len; i++)
		if (n[i] != want[i])
			return 0;
	return 1;
}

// classify_name sorts a final path component (NUL-terminated within 8
// bytes) into the /proc files the monitor cares about.
static __always_inline int classify_name(const char n[8])
{
	if (name_is(n, "mem", 4))
		return FK_MEM;
	if (name_is(n, "environ", 8))
		return FK_ENVIRON;
	if (name_is(n, "maps", 5))
		return FK_MAPS;
	if (name_is(n, "kcore", 6))
		return FK_KCORE;
	return FK_NONE;
}

// inode_is_candidate reports whether an inode, reached through BTF
// pointers (plain loads, no bpf_probe_read_kernel calls), is a character
// device or on procfs: the only files the monitor looks at further. Every
// open in the system passes this filter in detect mode, in the open
// tracepoints (Linux 6.2+); deny mode hooks no path every open takes.
static __always_inline int inode_is_candidate(struct inode *ino)
{
	if (!ino)
		return 0;
	return (ino->i_mode & S_IFMT) == S_IFCHR || ino->i_sb->s_magic == PROC_SUPER_MAGIC;
}

// classify_file reads what an open file really is: a /proc/<pid> file
// (whatever path reached it: symlinks, "..", dirfds, /proc/self) with the
// tgid it belongs to, /proc/kcore, or /dev/mem.
static __always_inline int classify_file(struct file *f, __u32 *tgid)
{
	struct inode *ino = BPF_CORE_READ(f, f_inode);
	struct super_block *sb = BPF_CORE_READ(ino, i_sb);
	char name[8] = {};
	int kind;

	*tgid = 0;
	if (!ino)
		return FK_NONE;
	if ((BPF_CORE_READ(ino, i_mode) & S_IFMT) == S_IFCHR) {
		if (BPF_CORE_READ(ino, i_rdev) == DEVMEM_RDEV)
			return FK_DEVMEM;
		return FK_NONE;
	}
	if (BPF_CORE_READ(sb, s_magic) != PROC_SUPER_MAGIC)
		return FK_NONE;
	struct dentry *d = BPF_CORE_READ(f, f_path.dentry);
	bpf_probe_read_kernel_str(name, sizeof(name), BPF_CORE_READ(d, d_name.name));
	kind = classify_name(name);
	if (kind == FK_NONE)
		return FK_NONE;
	if (kind == FK_KCORE) {
		// Only the kcore at the proc root is the kernel's memory.
		if (BPF_CORE_READ(d, d_parent) != BPF_CORE_READ(sb, s_root))
			return FK_NONE;
		return FK_KCORE;
	}
	struct proc_inode *pi = container_of(ino, struct proc_inode, vfs_inode);
	*tgid = tgid_of_pid(BPF_CORE_READ(pi, pid));
	if (!*tgid)
		return FK_NONE;
	return kind;
}

#endif
