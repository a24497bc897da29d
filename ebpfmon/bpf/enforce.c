// SPDX-License-Identifier: GPL-2.0
// Enforcement: BPF LSM programs that deny what monitor.c only reports. They
// load only where the kernel runs the bpf LSM (lsm=...,bpf); the loader
// reports detect-only mode, with the kernel's reason, everywhere else.
#include "common.h"

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

// file_open denies /proc/kcore and /dev/mem, which expose all of memory
// whatever pid holds the keys.
SEC("lsm/file_open")
int BPF_PROG(deny_open, struct file *file, int ret)
{
	__u32 tgid;
	int kind;

	if (ret)
		return ret;
	kind = classify_file(file, &tgid);
	if (kind != FK_KCORE && kind != FK_DEVMEM)
		return 0;
	if (allowed())
		return 0;
	return refuse();
}
