package xts

// impl names one implementation of the data path. Each Cipher keeps the one
// it was made with, so tests can run every implementation side by side.
type impl uint8

const (
	implGeneric impl = iota // table-based pure Go
	implAESNI               // AES-NI, 8 xmm blocks in flight
	implVAES256             // VAES + AVX2, 16 blocks in 8 ymm registers
	implVAES                // VAES + AVX-512, 32 blocks in 8 zmm registers
)

func (i impl) String() string {
	switch i {
	case implAESNI:
		return "aesni"
	case implVAES256:
		return "vaes256"
	case implVAES:
		return "vaes512"
	default:
		return "purego"
	}
}

// bestImpl is the fastest implementation this CPU supports.
func bestImpl() impl {
	impls := availableImpls()
	return impls[len(impls)-1]
}

// Implementation names the code New uses on this CPU: "vaes512", "vaes256",
// "aesni" or "purego". Callers can log it, and should warn on "purego",
// which is neither fast nor constant-time (see the package documentation).
func Implementation() string { return bestImpl().String() }
