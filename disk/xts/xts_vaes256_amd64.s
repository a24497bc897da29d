//go:build amd64 && !purego

#include "textflag.h"

// XTS-AES with VAES on ymm registers (AVX2 + VAES + VPCLMULQDQ, no
// AVX-512): for CPUs such as AMD Zen 3 and Intel Alder Lake. Each ymm holds
// two blocks and the main loop keeps eight (16 blocks) in flight. With only
// 16 vector registers the 16 tweaks live in the frame: two 256-byte areas,
// R12 the current one and R13 the next, so the next tweaks are computed
// while the AES rounds of this chunk run. The frame is cleared before
// returning.
//
// Registers: AX schedule base, BX data round keys (enc1x4 or dec1x4, one
// 64-byte line per round, of which a ymm operand reads the first two
// copies), DX rounds, DI dst, SI src, CX bytes left, Y0-Y7 data, Y8-Y13
// tweak scratch, Y14 the reduction constant 0x87 in each qword. As in the
// zmm code, round keys are only memory operands, never in registers that a
// signal frame could capture.

#define ROUND8(OP, K) \
	OP K, Y0, Y0 \
	OP K, Y1, Y1 \
	OP K, Y2, Y2 \
	OP K, Y3, Y3 \
	OP K, Y4, Y4 \
	OP K, Y5, Y5 \
	OP K, Y6, Y6 \
	OP K, Y7, Y7

// ADV writes tweak pair k of the next chunk: the current pair times x^16,
// which is a 2-byte shift of each lane with the 16 bits shifted out folded
// back in by a carry-less multiply with 0x87.
#define ADV(off) \
	VMOVDQU    off(R12), Y8    \
	VPSRLDQ    $14, Y8, Y9     \
	VPSLLDQ    $2, Y8, Y8      \
	VPCLMULQDQ $0, Y14, Y9, Y9 \
	VPXOR      Y9, Y8, Y8      \
	VMOVDQU    Y8, off(R13)

// MULBITS sets D = S*x^k in both lanes for k < 64 (r = 64-k); t1, t2 are
// scratch. SETUP derives the eight starting pairs from the first in at most
// two dependent steps, instead of a chain of seven.
#define MULBITS(S, D, t1, t2, k, r) \
	VPSRLQ     $r, S, t1        \
	VPSLLQ     $k, S, D         \
	VPSLLDQ    $8, t1, t2       \
	VPSRLDQ    $8, t1, t1       \
	VPCLMULQDQ $0, Y14, t1, t1  \
	VPXOR      t1, D, D         \
	VPXOR      t2, D, D

// MULBYTE sets D = S*x^8 in both lanes, with t scratch.
#define MULBYTE(S, D, t) \
	VPSRLDQ    $15, S, t      \
	VPSLLDQ    $1, S, D       \
	VPCLMULQDQ $0, Y14, t, t  \
	VPXOR      t, D, D

// MULX2 sets Y8 = Y8*x^2 in both lanes.
#define MULX2 \
	VPSRLQ     $62, Y8, Y9      \
	VPSLLQ     $2, Y8, Y8       \
	VPSLLDQ    $8, Y9, Y10      \
	VPSRLDQ    $8, Y9, Y9       \
	VPCLMULQDQ $0, Y14, Y9, Y9  \
	VPXOR      Y9, Y8, Y8       \
	VPXOR      Y10, Y8, Y8

#define IN(off, Y) \
	VMOVDQU off(SI), Y       \
	VPXOR   off(R12), Y, Y   \
	VPXOR   (BX), Y, Y

#define OUT(off, Y) \
	VPXOR   off(R12), Y, Y \
	VMOVDQU Y, off(DI)

#define ROUNDS8(OP, LAST, l128, ldone) \
	ROUND8(OP, 64(BX)) \
	ADV(0)     \
	ADV(32)    \
	ROUND8(OP, 128(BX)) \
	ADV(64)    \
	ADV(96)    \
	ROUND8(OP, 192(BX)) \
	ADV(128)   \
	ADV(160)   \
	ROUND8(OP, 256(BX)) \
	ADV(192)   \
	ADV(224)   \
	ROUND8(OP, 320(BX)) \
	ROUND8(OP, 384(BX)) \
	ROUND8(OP, 448(BX)) \
	ROUND8(OP, 512(BX)) \
	ROUND8(OP, 576(BX)) \
	CMPQ DX, $10 \
	JEQ  l128  \
	ROUND8(OP, 640(BX)) \
	ROUND8(OP, 704(BX)) \
	ROUND8(OP, 768(BX)) \
	ROUND8(OP, 832(BX)) \
	ROUND8(LAST, 896(BX)) \
	JMP  ldone \
l128:          \
	ROUND8(LAST, 640(BX)) \
ldone:

// ROUNDS1 runs the rounds on Y0 alone; with R = X0 it does one block.
#define ROUNDS1(OP, LAST, R, l128, ldone) \
	OP 64(BX), R, R  \
	OP 128(BX), R, R  \
	OP 192(BX), R, R  \
	OP 256(BX), R, R  \
	OP 320(BX), R, R  \
	OP 384(BX), R, R  \
	OP 448(BX), R, R  \
	OP 512(BX), R, R  \
	OP 576(BX), R, R  \
	CMPQ DX, $10 \
	JEQ  l128   \
	OP 640(BX), R, R  \
	OP 704(BX), R, R  \
	OP 768(BX), R, R  \
	OP 832(BX), R, R  \
	LAST 896(BX), R, R \
	JMP  ldone  \
l128:           \
	LAST 640(BX), R, R \
ldone:

#define SETUP \
	MOVQ        ks+0(FP), AX     \
	MOVQ        nr+8(FP), DX     \
	MOVQ        dst+16(FP), DI   \
	MOVQ        src+24(FP), SI   \
	MOVQ        n+32(FP), CX     \
	VMOVQ       tweak+40(FP), X0 \
	VPXOR       480(AX), X0, X0  \
	VAESENC     496(AX), X0, X0  \
	VAESENC     512(AX), X0, X0  \
	VAESENC     528(AX), X0, X0  \
	VAESENC     544(AX), X0, X0  \
	VAESENC     560(AX), X0, X0  \
	VAESENC     576(AX), X0, X0  \
	VAESENC     592(AX), X0, X0  \
	VAESENC     608(AX), X0, X0  \
	VAESENC     624(AX), X0, X0  \
	CMPQ        DX, $10          \
	JEQ         tw128            \
	VAESENC     640(AX), X0, X0  \
	VAESENC     656(AX), X0, X0  \
	VAESENC     672(AX), X0, X0  \
	VAESENC     688(AX), X0, X0  \
	VAESENCLAST 704(AX), X0, X0  \
	JMP         twdone           \
tw128:                           \
	VAESENCLAST 640(AX), X0, X0  \
twdone:                          \
	MOVQ         $0x87, R11      \
	VMOVQ        R11, X14        \
	VPBROADCASTQ X14, Y14        \
	VPSRLQ       $63, X0, X9     \
	VPSLLQ       $1, X0, X1      \
	VPSLLDQ      $8, X9, X10     \
	VPSRLDQ      $8, X9, X9      \
	VPCLMULQDQ   $0, X14, X9, X9 \
	VPXOR        X9, X1, X1      \
	VPXOR        X10, X1, X1     \
	VINSERTI128  $1, X1, Y0, Y0  \
	LEAQ         0(SP), R12      \
	LEAQ         256(SP), R13    \
	MULBITS(Y0, Y2, Y9, Y10, 4, 60)  \
	MULBYTE(Y0, Y4, Y11)         \
	MULBITS(Y0, Y1, Y12, Y13, 2, 62) \
	MULBITS(Y4, Y6, Y9, Y10, 4, 60)  \
	MULBITS(Y4, Y5, Y12, Y13, 2, 62) \
	MULBITS(Y2, Y3, Y9, Y10, 2, 62)  \
	MULBITS(Y6, Y7, Y12, Y13, 2, 62) \
	VMOVDQU      Y0, 0(R12)      \
	VMOVDQU      Y1, 32(R12)     \
	VMOVDQU      Y2, 64(R12)     \
	VMOVDQU      Y3, 96(R12)     \
	VMOVDQU      Y4, 128(R12)    \
	VMOVDQU      Y5, 160(R12)    \
	VMOVDQU      Y6, 192(R12)    \
	VMOVDQU      Y7, 224(R12)

#define BODY(OP, LAST) \
	SETUP                        \
loop16:                          \
	CMPQ CX, $256                \
	JB   pairs                   \
	IN(0, Y0)                    \
	IN(32, Y1)                   \
	IN(64, Y2)                   \
	IN(96, Y3)                   \
	IN(128, Y4)                  \
	IN(160, Y5)                  \
	IN(192, Y6)                  \
	IN(224, Y7)                  \
	ROUNDS8(OP, LAST, r8, r8done) \
	OUT(0, Y0)                   \
	OUT(32, Y1)                  \
	OUT(64, Y2)                  \
	OUT(96, Y3)                  \
	OUT(128, Y4)                 \
	OUT(160, Y5)                 \
	OUT(192, Y6)                 \
	OUT(224, Y7)                 \
	XCHGQ R12, R13               \
	ADDQ $256, SI                \
	ADDQ $256, DI                \
	SUBQ $256, CX                \
	JMP  loop16                  \
pairs:                           \
	VMOVDQU (R12), Y8            \
loop2:                           \
	CMPQ CX, $32                 \
	JB   single                  \
	VMOVDQU (SI), Y0             \
	VPXOR   Y8, Y0, Y0           \
	VPXOR   (BX), Y0, Y0         \
	ROUNDS1(OP, LAST, Y0, r2, r2done) \
	VPXOR   Y8, Y0, Y0           \
	VMOVDQU Y0, (DI)             \
	MULX2                        \
	ADDQ $32, SI                 \
	ADDQ $32, DI                 \
	SUBQ $32, CX                 \
	JMP  loop2                   \
single:                          \
	TESTQ CX, CX                 \
	JZ    done                   \
	VMOVDQU (SI), X0             \
	VPXOR   X8, X0, X0           \
	VPXOR   (BX), X0, X0         \
	ROUNDS1(OP, LAST, X0, r1, r1done) \
	VPXOR   X8, X0, X0           \
	VMOVDQU X0, (DI)             \
done:                            \
	VPXOR   Y8, Y8, Y8           \
	VMOVDQU Y8, 0(SP)           \
	VMOVDQU Y8, 32(SP)          \
	VMOVDQU Y8, 64(SP)          \
	VMOVDQU Y8, 96(SP)          \
	VMOVDQU Y8, 128(SP)         \
	VMOVDQU Y8, 160(SP)         \
	VMOVDQU Y8, 192(SP)         \
	VMOVDQU Y8, 224(SP)         \
	VMOVDQU Y8, 256(SP)         \
	VMOVDQU Y8, 288(SP)         \
	VMOVDQU Y8, 320(SP)         \
	VMOVDQU Y8, 352(SP)         \
	VMOVDQU Y8, 384(SP)         \
	VMOVDQU Y8, 416(SP)         \
	VMOVDQU Y8, 448(SP)         \
	VMOVDQU Y8, 480(SP)         \
	VZEROUPPER                   \
	RET

// func encVAES256(ks *byte, nr int, dst, src *byte, n int, tweak uint64)
TEXT ·encVAES256(SB), 0, $512-48
	MOVQ ks+0(FP), BX
	ADDQ $768, BX
	BODY(VAESENC, VAESENCLAST)

// func decVAES256(ks *byte, nr int, dst, src *byte, n int, tweak uint64)
TEXT ·decVAES256(SB), 0, $512-48
	MOVQ ks+0(FP), BX
	ADDQ $1728, BX
	BODY(VAESDEC, VAESDECLAST)

// func cpuid7ecx() uint32 returns CPUID leaf 7 sub-leaf 0 ECX, where VAES
// (bit 9) and VPCLMULQDQ (bit 10) are reported; x/sys/cpu only exposes them
// together with AVX-512.
TEXT ·cpuid7ecx(SB), NOSPLIT, $0-4
	MOVL $7, AX
	XORL CX, CX
	CPUID
	MOVL CX, ret+0(FP)
	RET
