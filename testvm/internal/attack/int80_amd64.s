#include "textflag.h"

// func int80(nr, a1, a2, a3 uintptr) uintptr: a 32-bit syscall from this
// 64-bit process, arguments in ebx, ecx, edx as the ia32 ABI has them.
TEXT ·int80(SB), NOSPLIT, $0-40
	MOVQ nr+0(FP), AX
	MOVQ a1+8(FP), BX
	MOVQ a2+16(FP), CX
	MOVQ a3+24(FP), DX
	INT  $0x80
	MOVQ AX, ret+32(FP)
	RET

// func int80x6(nr, a1, a2, a3, a4, a5, a6 uintptr) uintptr: the same with
// six arguments, in ebx, ecx, edx, esi, edi, ebp; BP is Go's frame pointer,
// kept in R12 across the call.
TEXT ·int80x6(SB), NOSPLIT, $0-64
	MOVQ nr+0(FP), AX
	MOVQ a1+8(FP), BX
	MOVQ a2+16(FP), CX
	MOVQ a3+24(FP), DX
	MOVQ a4+32(FP), SI
	MOVQ a5+40(FP), DI
	MOVQ BP, R12
	MOVQ a6+48(FP), BP
	INT  $0x80
	MOVQ R12, BP
	MOVQ AX, ret+56(FP)
	RET
