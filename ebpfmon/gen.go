package ebpfmon

// The BPF objects and their Go bindings are generated and committed; `make
// generate` rebuilds them with Debian's clang and llvm-strip, and
// TestGeneratedFresh checks that the committed ones match the sources.
//
// bpf/vmlinux.h is the whole BTF of the kernel the objects were first built
// on (6.18), dumped with
//
//	bpftool btf dump file /sys/kernel/btf/vmlinux format c > bpf/vmlinux.h
//
// The programs read kernel structs through CO-RE, so the loader relocates
// field offsets to the running kernel; the header needs regenerating only to
// use types it lacks, and make generate leaves it alone.
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang -cflags "-O2 -g -Wall -Werror" -target bpfel -type event monitor bpf/monitor.c -- -I./bpf
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang -cflags "-O2 -g -Wall -Werror" -target bpfel enforce bpf/enforce.c -- -I./bpf
