//go:build amd64 && !purego

#include "textflag.h"

// XTS-AES with AES-NI: eight blocks in flight so that the AESENC latency
// (4-7 cycles) is hidden behind the throughput (1-2 per cycle).
//
// Registers: AX schedule base, BX data round keys (enc1 or dec1), DX rounds,
// DI dst, SI src, CX bytes left, R8:R9 the current tweak (lo:hi),
// X0-X7 data, X8-X15 tweaks. Round keys are only ever memory operands
// (aligned: see lockedSize), so no key material is left in registers.
//
// Layout of the schedule (see xts.go): enc1 at 0, dec1 at 240, enc2 at 480.

// DOUBLE multiplies the tweak R8:R9 by x: a 128-bit shift left, and the bit
// shifted out folded back in as 0x87.
#define DOUBLE \
	MOVQ  R9, R11   \
	SARQ  $63, R11  \
	ANDQ  $0x87, R11 \
	ADDQ  R8, R8    \
	ADCQ  R9, R9    \
	XORQ  R11, R8

#define LOADTWEAK(X) \
	MOVQ   R8, X     \
	PINSRQ $1, R9, X \
	DOUBLE

#define ROUND8(OP, off) \
	OP off(BX), X0 \
	OP off(BX), X1 \
	OP off(BX), X2 \
	OP off(BX), X3 \
	OP off(BX), X4 \
	OP off(BX), X5 \
	OP off(BX), X6 \
	OP off(BX), X7

#define IN8(i, X, T) \
	MOVOU (i*16)(SI), X \
	PXOR  T, X          \
	PXOR  (BX), X

#define OUT8(i, X, T) \
	PXOR  T, X \
	MOVOU X, (i*16)(DI)

// XTS8 runs OP over rounds 1..nr-1 and LAST for the final round, on X0-X7.
#define XTS8(OP, LAST, lbl, lbldone) \
	ROUND8(OP, 16)   \
	ROUND8(OP, 32)   \
	ROUND8(OP, 48)   \
	ROUND8(OP, 64)   \
	ROUND8(OP, 80)   \
	ROUND8(OP, 96)   \
	ROUND8(OP, 112)  \
	ROUND8(OP, 128)  \
	ROUND8(OP, 144)  \
	CMPQ DX, $10     \
	JEQ  lbl         \
	ROUND8(OP, 160)  \
	ROUND8(OP, 176)  \
	ROUND8(OP, 192)  \
	ROUND8(OP, 208)  \
	ROUND8(LAST, 224) \
	JMP  lbldone   \
lbl:                 \
	ROUND8(LAST, 160) \
lbldone:

#define XTS1(OP, LAST, lbl, lbldone) \
	OP 16(BX), X0  \
	OP 32(BX), X0  \
	OP 48(BX), X0  \
	OP 64(BX), X0  \
	OP 80(BX), X0  \
	OP 96(BX), X0  \
	OP 112(BX), X0 \
	OP 128(BX), X0 \
	OP 144(BX), X0 \
	CMPQ DX, $10   \
	JEQ  lbl       \
	OP 160(BX), X0 \
	OP 176(BX), X0 \
	OP 192(BX), X0 \
	OP 208(BX), X0 \
	LAST 224(BX), X0 \
	JMP  lbldone \
lbl:               \
	LAST 160(BX), X0 \
lbldone:

// TWEAK0 encrypts the data-unit number (tweak+40(FP), zero-extended to 128
// bits) with enc2 and leaves it in R8:R9.
#define TWEAK0 \
	MOVQ       tweak+40(FP), X8 \
	PXOR       480(AX), X8      \
	AESENC     496(AX), X8      \
	AESENC     512(AX), X8      \
	AESENC     528(AX), X8      \
	AESENC     544(AX), X8      \
	AESENC     560(AX), X8      \
	AESENC     576(AX), X8      \
	AESENC     592(AX), X8      \
	AESENC     608(AX), X8      \
	AESENC     624(AX), X8      \
	CMPQ       DX, $10          \
	JEQ        tw128            \
	AESENC     640(AX), X8      \
	AESENC     656(AX), X8      \
	AESENC     672(AX), X8      \
	AESENC     688(AX), X8      \
	AESENCLAST 704(AX), X8      \
	JMP        twdone           \
tw128:                          \
	AESENCLAST 640(AX), X8      \
twdone:                         \
	MOVQ       X8, R8           \
	PEXTRQ     $1, X8, R9

#define BODY(OP, LAST) \
	MOVQ ks+0(FP), AX  \
	MOVQ nr+8(FP), DX  \
	MOVQ dst+16(FP), DI \
	MOVQ src+24(FP), SI \
	MOVQ n+32(FP), CX  \
	TWEAK0             \
loop8:                 \
	CMPQ CX, $128      \
	JB   tail          \
	LOADTWEAK(X8)      \
	LOADTWEAK(X9)      \
	LOADTWEAK(X10)     \
	LOADTWEAK(X11)     \
	LOADTWEAK(X12)     \
	LOADTWEAK(X13)     \
	LOADTWEAK(X14)     \
	LOADTWEAK(X15)     \
	IN8(0, X0, X8)     \
	IN8(1, X1, X9)     \
	IN8(2, X2, X10)    \
	IN8(3, X3, X11)    \
	IN8(4, X4, X12)    \
	IN8(5, X5, X13)    \
	IN8(6, X6, X14)    \
	IN8(7, X7, X15)    \
	XTS8(OP, LAST, r8, r8done) \
	OUT8(0, X0, X8)    \
	OUT8(1, X1, X9)    \
	OUT8(2, X2, X10)   \
	OUT8(3, X3, X11)   \
	OUT8(4, X4, X12)   \
	OUT8(5, X5, X13)   \
	OUT8(6, X6, X14)   \
	OUT8(7, X7, X15)   \
	ADDQ $128, SI      \
	ADDQ $128, DI      \
	SUBQ $128, CX      \
	JMP  loop8         \
tail:                  \
	TESTQ CX, CX       \
	JZ   ret           \
	LOADTWEAK(X8)      \
	MOVOU (SI), X0     \
	PXOR X8, X0        \
	PXOR (BX), X0      \
	XTS1(OP, LAST, r1, r1done) \
	PXOR X8, X0        \
	MOVOU X0, (DI)     \
	ADDQ $16, SI       \
	ADDQ $16, DI       \
	SUBQ $16, CX       \
	JMP  tail          \
ret:                   \
	RET

// func encAESNI(ks *byte, nr int, dst, src *byte, n int, tweak uint64)
TEXT ·encAESNI(SB), NOSPLIT, $0-48
	MOVQ ks+0(FP), BX
	BODY(AESENC, AESENCLAST)

// func decAESNI(ks *byte, nr int, dst, src *byte, n int, tweak uint64)
TEXT ·decAESNI(SB), NOSPLIT, $0-48
	MOVQ ks+0(FP), BX
	ADDQ $240, BX
	BODY(AESDEC, AESDECLAST)
