//go:build amd64 && !purego

package xts

import "golang.org/x/sys/cpu"

// The SSE path needs SSE4.1 for PINSRQ/PEXTRQ; every CPU with AES-NI has it.
var hasAESNI = cpu.X86.HasAES && cpu.X86.HasSSE41

// The zmm path uses AVX512F, AVX512BW (byte shifts of zmm lanes, VPSLLDQ and
// VPSRLDQ), and VAES and VPCLMULQDQ on zmm. x/sys/cpu reports all of these
// only when the OS saves zmm state.
var hasVAES512 = hasAESNI && cpu.X86.HasAVX512F && cpu.X86.HasAVX512BW &&
	cpu.X86.HasAVX512VAES && cpu.X86.HasAVX512VPCLMULQDQ

// The ymm path needs VAES and VPCLMULQDQ in their VEX forms, which CPUID
// leaf 7 reports even where AVX-512 is absent. HasAVX2 already says that leaf
// 7 exists and that the OS saves ymm state.
var hasVAES256 = hasAESNI && cpu.X86.HasAVX2 && cpuid7ecx()&(1<<9|1<<10) == 1<<9|1<<10

func cpuid7ecx() uint32

// availableImpls lists the implementations this CPU runs, slowest first.
func availableImpls() []impl {
	impls := []impl{implGeneric}
	if hasAESNI {
		impls = append(impls, implAESNI)
	}
	if hasVAES256 {
		impls = append(impls, implVAES256)
	}
	if hasVAES512 {
		impls = append(impls, implVAES)
	}
	return impls
}

// The assembly takes ks as the base of the locked schedule (offEnc1,
// offDec1 and offEnc2 are hard-coded there) and n as a non-zero multiple of
// 16.

//go:noescape
func encAESNI(ks *byte, nr int, dst, src *byte, n int, tweak uint64)

//go:noescape
func decAESNI(ks *byte, nr int, dst, src *byte, n int, tweak uint64)

//go:noescape
func encVAES256(ks *byte, nr int, dst, src *byte, n int, tweak uint64)

//go:noescape
func decVAES256(ks *byte, nr int, dst, src *byte, n int, tweak uint64)

//go:noescape
func encVAES512(ks *byte, nr int, dst, src *byte, n int, tweak uint64)

//go:noescape
func decVAES512(ks *byte, nr int, dst, src *byte, n int, tweak uint64)

func cryptAsm(im impl, ks []byte, nr int, dst, src []byte, tweak uint64, dec bool) bool {
	switch {
	case im == implVAES && !dec:
		encVAES512(&ks[0], nr, &dst[0], &src[0], len(src), tweak)
	case im == implVAES:
		decVAES512(&ks[0], nr, &dst[0], &src[0], len(src), tweak)
	case im == implVAES256 && !dec:
		encVAES256(&ks[0], nr, &dst[0], &src[0], len(src), tweak)
	case im == implVAES256:
		decVAES256(&ks[0], nr, &dst[0], &src[0], len(src), tweak)
	case im == implAESNI && !dec:
		encAESNI(&ks[0], nr, &dst[0], &src[0], len(src), tweak)
	case im == implAESNI:
		decAESNI(&ks[0], nr, &dst[0], &src[0], len(src), tweak)
	default:
		return false
	}
	return true
}
