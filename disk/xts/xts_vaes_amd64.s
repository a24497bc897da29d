//go:build amd64 && !purego

#include "textflag.h"

// XTS-AES with VAES on zmm registers: each zmm holds four blocks, and the
// main loop keeps eight of them (32 blocks, 512 bytes) in flight, enough to
// cover VAESENC's latency at one zmm per cycle.
//
// Registers: AX schedule base, BX data round keys (enc1x4 or dec1x4: each
// round key repeated in four lanes, 64 bytes apart), DX rounds, DI dst,
// SI src, CX bytes left. Z0-Z7 data, Z8-Z15 tweaks (lane i of Zk holds the
// tweak of block 4(k-8)+i of the current chunk), Z31 the reduction constant
// 0x87 in each qword.
//
// Round keys are only ever memory operands, never loaded into registers: a
// signal that interrupts this code makes the kernel save the vector
// registers into a signal frame in ordinary (Go) memory, where key material
// would outlive the call.
//
// Tweaks are multiplied by x^k four lanes at a time: shift each 128-bit lane
// left by k bits and fold the k bits shifted out back in with a carry-less
// multiply by 0x87 (x^128 = x^7+x^2+x+1), which fits in the low qword for
// k <= 57.

// Per-qword shift counts that turn a broadcast tweak T into T*x^i in lane i.
DATA xtsLaneShl<>+0(SB)/8, $0
DATA xtsLaneShl<>+8(SB)/8, $0
DATA xtsLaneShl<>+16(SB)/8, $1
DATA xtsLaneShl<>+24(SB)/8, $1
DATA xtsLaneShl<>+32(SB)/8, $2
DATA xtsLaneShl<>+40(SB)/8, $2
DATA xtsLaneShl<>+48(SB)/8, $3
DATA xtsLaneShl<>+56(SB)/8, $3
GLOBL xtsLaneShl<>(SB), RODATA|NOPTR, $64

DATA xtsLaneShr<>+0(SB)/8, $64
DATA xtsLaneShr<>+8(SB)/8, $64
DATA xtsLaneShr<>+16(SB)/8, $63
DATA xtsLaneShr<>+24(SB)/8, $63
DATA xtsLaneShr<>+32(SB)/8, $62
DATA xtsLaneShr<>+40(SB)/8, $62
DATA xtsLaneShr<>+48(SB)/8, $61
DATA xtsLaneShr<>+56(SB)/8, $61
GLOBL xtsLaneShr<>(SB), RODATA|NOPTR, $64

// MULX4 sets D = S*x^4 in every lane; t1, t2 are scratch. S may equal D.
#define MULX4(S, D, t1, t2) \
	VPSRLQ     $60, S, t1      \
	VPSLLQ     $4, S, D        \
	VPSLLDQ    $8, t1, t2      \
	VPSRLDQ    $8, t1, t1      \
	VPCLMULQDQ $0, Z31, t1, t1 \
	VPTERNLOGQ $0x96, t1, t2, D

// MULBYTES sets D = S*x^(8*n) for n < 8 (r = 16-n), with t scratch: a
// whole-byte shift of each lane. The setup uses it so that the eight
// starting tweaks are at most two steps from the first, not seven.
#define MULBYTES(S, D, t, n, r) \
	VPSRLDQ    $r, S, t      \
	VPSLLDQ    $n, S, D      \
	VPCLMULQDQ $0, Z31, t, t \
	VPXORQ     t, D, D

// MULX32 sets T = T*x^32 in every lane: a 4-byte shift of each lane, with
// the top 32 bits reduced by one carry-less multiply.
#define MULX32(T, t) \
	VPSRLDQ    $12, T, t     \
	VPSLLDQ    $4, T, T      \
	VPCLMULQDQ $0, Z31, t, t \
	VPXORQ     t, T, T

#define ROUND8(OP, K) \
	OP K, Z0, Z0 \
	OP K, Z1, Z1 \
	OP K, Z2, Z2 \
	OP K, Z3, Z3 \
	OP K, Z4, Z4 \
	OP K, Z5, Z5 \
	OP K, Z6, Z6 \
	OP K, Z7, Z7

#define IN8(off, Z, T) \
	VMOVDQU64  off(SI), Z \
	VPTERNLOGQ $0x96, (BX), T, Z

#define OUT8(off, Z, T) \
	VPXORQ    T, Z, Z \
	VMOVDQU64 Z, off(DI)

#define ROUNDS8(OP, LAST, l128, ldone) \
	ROUND8(OP, 64(BX))   \
	ROUND8(OP, 128(BX))   \
	ROUND8(OP, 192(BX))   \
	ROUND8(OP, 256(BX))   \
	ROUND8(OP, 320(BX))   \
	ROUND8(OP, 384(BX))   \
	ROUND8(OP, 448(BX))   \
	ROUND8(OP, 512(BX))   \
	ROUND8(OP, 576(BX))   \
	CMPQ DX, $10      \
	JEQ  l128         \
	ROUND8(OP, 640(BX))   \
	ROUND8(OP, 704(BX))   \
	ROUND8(OP, 768(BX))   \
	ROUND8(OP, 832(BX))   \
	ROUND8(LAST, 896(BX)) \
	JMP  ldone        \
l128:                 \
	ROUND8(LAST, 640(BX)) \
ldone:

#define ROUNDS1(OP, LAST, l128, ldone) \
	OP   64(BX), Z0, Z0 \
	OP   128(BX), Z0, Z0 \
	OP   192(BX), Z0, Z0 \
	OP   256(BX), Z0, Z0 \
	OP   320(BX), Z0, Z0 \
	OP   384(BX), Z0, Z0 \
	OP   448(BX), Z0, Z0 \
	OP   512(BX), Z0, Z0 \
	OP   576(BX), Z0, Z0 \
	CMPQ DX, $10     \
	JEQ  l128        \
	OP   640(BX), Z0, Z0 \
	OP   704(BX), Z0, Z0 \
	OP   768(BX), Z0, Z0 \
	OP   832(BX), Z0, Z0 \
	LAST 896(BX), Z0, Z0 \
	JMP  ldone       \
l128:                \
	LAST 640(BX), Z0, Z0 \
ldone:

// SETUP encrypts the data-unit number with enc2, spreads the first 32
// tweaks over Z8-Z15.
#define SETUP \
	MOVQ          ks+0(FP), AX      \
	MOVQ          nr+8(FP), DX      \
	MOVQ          dst+16(FP), DI    \
	MOVQ          src+24(FP), SI    \
	MOVQ          n+32(FP), CX      \
	VMOVQ         tweak+40(FP), X0  \
	VPXOR         480(AX), X0, X0   \
	VAESENC       496(AX), X0, X0   \
	VAESENC       512(AX), X0, X0   \
	VAESENC       528(AX), X0, X0   \
	VAESENC       544(AX), X0, X0   \
	VAESENC       560(AX), X0, X0   \
	VAESENC       576(AX), X0, X0   \
	VAESENC       592(AX), X0, X0   \
	VAESENC       608(AX), X0, X0   \
	VAESENC       624(AX), X0, X0   \
	CMPQ          DX, $10           \
	JEQ           tw128             \
	VAESENC       640(AX), X0, X0   \
	VAESENC       656(AX), X0, X0   \
	VAESENC       672(AX), X0, X0   \
	VAESENC       688(AX), X0, X0   \
	VAESENCLAST   704(AX), X0, X0   \
	JMP           twdone            \
tw128:                              \
	VAESENCLAST   640(AX), X0, X0   \
twdone:                             \
	MOVQ          $0x87, R11        \
	VPBROADCASTQ  R11, Z31          \
	VSHUFI64X2    $0, Z0, Z0, Z8    \
	VMOVDQU64     xtsLaneShr<>(SB), Z1 \
	VMOVDQU64     xtsLaneShl<>(SB), Z2 \
	VPSRLVQ       Z1, Z8, Z1        \
	VPSLLVQ       Z2, Z8, Z8        \
	VPSLLDQ       $8, Z1, Z2        \
	VPSRLDQ       $8, Z1, Z1        \
	VPCLMULQDQ    $0, Z31, Z1, Z1   \
	VPTERNLOGQ    $0x96, Z1, Z2, Z8 \
	MULBYTES(Z8, Z10, Z3, 1, 15)    \
	MULBYTES(Z8, Z12, Z4, 2, 14)    \
	MULBYTES(Z8, Z14, Z5, 3, 13)    \
	MULX4(Z8, Z9, Z1, Z2)           \
	MULX4(Z10, Z11, Z3, Z6)         \
	MULX4(Z12, Z13, Z4, Z7)         \
	MULX4(Z14, Z15, Z5, Z0)

#define BODY(OP, LAST) \
	SETUP                         \
loop32:                           \
	CMPQ CX, $512                 \
	JB   loop4                    \
	IN8(0, Z0, Z8)                \
	IN8(64, Z1, Z9)               \
	IN8(128, Z2, Z10)             \
	IN8(192, Z3, Z11)             \
	IN8(256, Z4, Z12)             \
	IN8(320, Z5, Z13)             \
	IN8(384, Z6, Z14)             \
	IN8(448, Z7, Z15)             \
	ROUNDS8(OP, LAST, r8, r8done) \
	OUT8(0, Z0, Z8)               \
	OUT8(64, Z1, Z9)              \
	OUT8(128, Z2, Z10)            \
	OUT8(192, Z3, Z11)            \
	OUT8(256, Z4, Z12)            \
	OUT8(320, Z5, Z13)            \
	OUT8(384, Z6, Z14)            \
	OUT8(448, Z7, Z15)            \
	MULX32(Z8, Z0)                \
	MULX32(Z9, Z1)                \
	MULX32(Z10, Z2)               \
	MULX32(Z11, Z3)               \
	MULX32(Z12, Z4)               \
	MULX32(Z13, Z5)               \
	MULX32(Z14, Z6)               \
	MULX32(Z15, Z7)               \
	ADDQ $512, SI                 \
	ADDQ $512, DI                 \
	SUBQ $512, CX                 \
	JMP  loop32                   \
loop4:                            \
	CMPQ CX, $64                  \
	JB   tail                     \
	VMOVDQU64  (SI), Z0           \
	VPTERNLOGQ $0x96, (BX), Z8, Z0 \
	ROUNDS1(OP, LAST, r4, r4done) \
	VPXORQ     Z8, Z0, Z0         \
	VMOVDQU64  Z0, (DI)           \
	MULX4(Z8, Z8, Z1, Z2)         \
	ADDQ $64, SI                  \
	ADDQ $64, DI                  \
	SUBQ $64, CX                  \
	JMP  loop4                    \
tail:                             \
	TESTQ CX, CX                  \
	JZ    done                    \
	SHRQ  $3, CX                  \
	MOVL  $1, R11                 \
	SHLL  CX, R11                 \
	DECL  R11                     \
	KMOVW R11, K1                 \
	VMOVDQU64.Z (SI), K1, Z0      \
	VPTERNLOGQ $0x96, (BX), Z8, Z0 \
	ROUNDS1(OP, LAST, r1, r1done) \
	VPXORQ     Z8, Z0, Z0         \
	VMOVDQU64  Z0, K1, (DI)       \
done:                             \
	VZEROUPPER                    \
	RET

// func encVAES512(ks *byte, nr int, dst, src *byte, n int, tweak uint64)
TEXT ·encVAES512(SB), NOSPLIT, $0-48
	MOVQ ks+0(FP), BX
	ADDQ $768, BX
	BODY(VAESENC, VAESENCLAST)

// func decVAES512(ks *byte, nr int, dst, src *byte, n int, tweak uint64)
TEXT ·decVAES512(SB), NOSPLIT, $0-48
	MOVQ ks+0(FP), BX
	ADDQ $1728, BX
	BODY(VAESDEC, VAESDECLAST)
