// SPDX-License-Identifier: GPL-2.0
// Opens: judging what an open reached, for every route into the kernel's
// open path the monitor hooks (openat, openat2, open, creat, their 32-bit
// int 0x80 forms, io_uring). Included by monitor.c after the event, its
// maps and send(); kept apart so that monitor.c stays readable.
#ifndef KEYGATE_OPENS_H
#define KEYGATE_OPENS_H

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
// from user memory, were most of the monitor's cost. flag says which
// syscall: openat(dfd, path, flags), openat2(dfd, path, how), open(path,
// flags) or creat(path, mode); F_COMPAT, that it came through int 0x80,
// whose arguments are in ebx, ecx, edx (see syscall_args).
static __always_inline void open_args(__u32 flag, int *dfd, const char **fn, __u64 *flags)
{
	__u64 a[6];
	__u64 a0, a1, a2;

	syscall_args(a, flag & F_COMPAT);
	a0 = a[0];
	a1 = a[1];
	a2 = a[2];
	if (flag & (F_OPEN | F_CREAT)) {
		// No directory fd: the path is the first argument.
		*dfd = AT_FDCWD;
		*fn = (const char *)a0;
		*flags = (flag & F_CREAT) ? O_CREAT_TRUNC_WRONLY : a1;
		return;
	}
	*dfd = (int)a0;
	*fn = (const char *)a1;
	*flags = a2;
	if (flag & F_OPENAT2) {
		// openat2's third argument is a struct open_how; flags come first.
		__u64 f = 0;
		bpf_probe_read_user(&f, sizeof(f), (void *)a2);
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
	return inode_is_candidate(f->f_inode);
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

// report_open sends the event for an open that may_matter let through: f
// is the opened file (none for a failed open), ret and nr the syscall's
// result and number. F_IO_URING opens have neither path nor flags (the ring
// holds them in kernel memory, already released) and are judged from f.
static __always_inline int report_open(struct file *f, __u32 flag, long ret, __s32 nr)
{
	__u32 tgid = 0;
	int kind = FK_NONE;
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
	struct scratch *s = new_event(0, nr);
	if (!s)
		return 0;
	struct event *e = &s->e;
	e->flags = flag;
	e->result = ret;
	if (!(flag & F_IO_URING)) {
		int dfd;
		const char *fn;
		__u64 flags;
		struct dentry *base = 0;

		open_args(flag, &dfd, &fn, &flags);
		e->arg = flags;
		long n = bpf_probe_read_user_str(e->path, sizeof(e->path), fn);
		if (e->path[0] != '/')
			base_on_procfs(dfd, &base);
		// The path names the target as the caller wrote it (a thread id,
		// perhaps), and is all a failed open has.
		guess_open(e, n > 0 ? n - 1 : 0, base);
	}
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
		send(e);
		break;
	case T_KCORE:
	case T_DEVMEM:
		e->flags |= F_OVERLAP;
		send(e);
		break;
	}
	return 0;
}

static __always_inline int open_exit(long ret, __s32 nr, __u32 flag)
{
	struct file *f;

	if (!may_matter(ret, flag, &f))
		return 0;
	return report_open(f, flag, ret, nr);
}

#endif
