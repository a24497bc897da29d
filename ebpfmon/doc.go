// Package ebpfmon watches, from the kernel, every way another process could
// read a key holder's memory, and denies it where the kernel allows.
//
// It owns the BPF programs (bpf/*.c, built by bpf2go into the committed
// *_bpfel.{go,o}), their loader, the decoding of their ring-buffer records
// into [Event]s, the severity policy, and the sinks events go to (JSON lines,
// Prometheus counters, an alert hook). Syscall tracepoints detect
// process_vm_readv/writev, ptrace attach/seize/peek/poke, opens of
// /proc/<pid>/mem (and environ and maps), pidfd_getfd, perf_event_open and
// opens of /proc/kcore and /dev/mem. Where the BPF LSM is active, LSM
// programs report and deny them instead (deny mode: ptrace_access_check,
// which procfs also asks from inside the opens of mem, environ and maps;
// locked_down, which kcore's and /dev/mem's opens ask; perf_event_open),
// and no syscall tracepoint nor any hook every open passes is attached;
// [Monitor.Mode] says which mode is in force and why, and the monitor
// never claims enforcement the kernel did not give it.
//
// The registry of a key holder's own key pages lives in package keymem,
// which every key buffer uses without pulling in BPF; the adapter to
// keysvc's wire type lives in package keysvcsink. docs/monitor.md describes
// the techniques, the event fields and the kernel requirements.
package ebpfmon
