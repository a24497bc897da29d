// SPDX-License-Identifier: GPL-2.0
// Maps and types shared by monitor.c (syscall tracepoints, detection) and
// enforce.c (BPF LSM, denial). The loader creates the maps once, from the
// monitor object, and hands them to the enforce object, so both programs see
// the same protected set, and the monitor sees the enforcer's refusals.
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

// denials: an accessor thread (pid_tgid) -> the syscall it was in when an
// enforce.c program refused it. monitor.c's exit programs consume the record
// when they send an event, so that `denied` says the LSM refused, not merely
// that the syscall failed with some errno (mm_access turns our EPERM into
// EACCES for /proc/<pid>/mem). The syscall number keeps a record left by a
// syscall the monitor does not report from marking another one's event; LRU,
// so that such records cannot pile up.
struct denial {
	__s32 nr; // the syscall number, as the exit tracepoint's nr gives it
	__u32 _pad;
};
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct denial);
} denials SEC(".maps");

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
