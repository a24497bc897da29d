package luks2_test

import (
	"fmt"
	"log"
	"os"

	"github.com/keygate/keygate/disk/luks2"
)

// exampleImage makes a sparse 20 MiB image file: Format does not size files.
func exampleImage() *os.File {
	f, err := os.CreateTemp("", "luks2-example-*.img")
	if err != nil {
		log.Fatal(err)
	}
	if err := f.Truncate(20 << 20); err != nil {
		log.Fatal(err)
	}
	return f
}

func ExampleFormat() {
	f := exampleImage()
	defer os.Remove(f.Name())
	defer f.Close()

	// KeyPBKDF suits a high-entropy key file; use PassphrasePBKDF (the
	// default) for anything a human types.
	v, vk, err := luks2.Format(f, []byte("key file bytes"), luks2.FormatOptions{
		SectorSize: 4096,
		Label:      "data",
		PBKDF:      luks2.KeyPBKDF(),
	})
	if err != nil {
		log.Fatal(err)
	}
	defer vk.Destroy()

	off, sector, cipher := v.Segment()
	fmt.Println(off, sector, cipher, vk.Size())
	// Output: 16777216 4096 aes-xts-plain64 64
}

func ExampleOpen() {
	f := exampleImage()
	defer os.Remove(f.Name())
	defer f.Close()
	if _, vk, err := luks2.Format(f, []byte("pw"), luks2.FormatOptions{PBKDF: luks2.KeyPBKDF(), Label: "data"}); err != nil {
		log.Fatal(err)
	} else {
		vk.Destroy()
	}

	v, err := luks2.Open(f)
	if err != nil {
		log.Fatal(err) // ErrNotLUKS2, ErrTruncated, or a *BothCopiesError naming the failed checks
	}
	in := v.Info()
	fmt.Println(in.Label, in.SeqID, len(in.Keyslots), in.Headers[0].OK, in.Headers[1].OK)
	// Output: data 1 1 true true
}

func ExampleVolume_Unlock() {
	f := exampleImage()
	defer os.Remove(f.Name())
	defer f.Close()
	if _, vk, err := luks2.Format(f, []byte("right"), luks2.FormatOptions{PBKDF: luks2.KeyPBKDF()}); err != nil {
		log.Fatal(err)
	} else {
		vk.Destroy()
	}
	v, err := luks2.Open(f)
	if err != nil {
		log.Fatal(err)
	}

	if _, _, err := v.Unlock([]byte("wrong")); err != nil {
		fmt.Println(err)
	}
	vk, slot, err := v.Unlock([]byte("right"))
	if err != nil {
		log.Fatal(err)
	}
	defer vk.Destroy() // the volume key lives in locked memory until then
	fmt.Println("opened by keyslot", slot)
	// Output:
	// no keyslot opened with this passphrase (tried slot 0); check the key file: wrong passphrase or key file
	// opened by keyslot 0
}

func ExampleVolume_SetToken() {
	f := exampleImage()
	defer os.Remove(f.Name())
	defer f.Close()
	v, vk, err := luks2.Format(f, []byte("recovery"), luks2.FormatOptions{PBKDF: luks2.KeyPBKDF()})
	if err != nil {
		log.Fatal(err)
	}
	defer vk.Destroy()

	// The unwrap key from the key service opens its own pbkdf2 keyslot,
	// which a keygate token names.
	slot, err := v.AddKeyslot(vk, []byte("32 random bytes from keysvc....."), luks2.KeyPBKDF())
	if err != nil {
		log.Fatal(err)
	}
	tok, err := luks2.KeygateToken{
		Keyslot:  slot,
		URL:      "https://keysvc.example:8443",
		VolumeID: "vol-42",
		CASHA256: "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
	}.Token()
	if err != nil {
		log.Fatal(err)
	}
	id, err := v.AddToken(tok)
	if err != nil {
		log.Fatal(err)
	}
	_, kt, _ := v.FindKeygateToken()
	fmt.Println(id, kt.Keyslot, kt.VolumeID)
	// Output: 0 1 vol-42
}
