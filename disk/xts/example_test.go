package xts_test

import (
	"bytes"
	"fmt"

	"github.com/keygate/keygate/disk/xts"
)

// A LUKS2 volume with 4096-byte sectors counts tweaks in 512-byte units,
// so consecutive sectors step the tweak by 8.
func ExampleCipher_EncryptSectors() {
	key := bytes.Repeat([]byte{0x42}, 64) // AES-256-XTS; a real DEK comes from a keyslot
	c, err := xts.New(key)
	if err != nil {
		panic(err)
	}
	defer c.Close()
	clear(key) // the schedule lives in locked memory; the caller's copy can go

	buf := make([]byte, 4*4096)
	firstSector := uint64(10)
	c.EncryptSectors(buf, buf, 4096, firstSector*8, 8)
	c.DecryptSectors(buf, buf, 4096, firstSector*8, 8)
	fmt.Println(bytes.Equal(buf, make([]byte, len(buf))))
	// Output: true
}
