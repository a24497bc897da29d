package tpm

import (
	"encoding/binary"
	"fmt"
	"slices"
	"strings"

	"github.com/google/go-tpm-tools/client"
	"github.com/google/go-tpm/legacy/tpm2"
)

// Info describes a TPM: who made it, which spec it implements, and which
// PCR banks it has. It holds no key; see [TPM.EK] and [TPM.AK] for those.
type Info struct {
	// Kind and Spec say how the TPM was opened.
	Kind Kind   `json:"-"`
	Spec string `json:"spec"`
	// Manufacturer is the TCG vendor ID, four ASCII characters such as
	// "IBM", "MSFT", "GOOG", "INTC" (trailing spaces and NULs trimmed).
	Manufacturer string `json:"manufacturer"`
	// VendorString is the free-form vendor description, often the model.
	VendorString string `json:"vendor_string,omitempty"`
	// FirmwareVersion is TPM_PT_FIRMWARE_VERSION_1 and _2 read as four
	// 16-bit decimal numbers "a.b.c.d", as fwupd shows it; the meaning is
	// the vendor's. FirmwareRaw is the two words in hex, as tpm2_getcap
	// shows them.
	FirmwareVersion string `json:"firmware_version"`
	FirmwareRaw     string `json:"firmware_raw"`
	// SpecVersion is the TPM library spec family, level and revision,
	// e.g. "2.0 level 0 revision 1.59".
	SpecVersion string `json:"spec_version"`
	// SpecDate is the spec's date of publication as "YEAR day DAY".
	SpecDate string `json:"spec_date,omitempty"`
	// PCRBanks lists the allocated PCR banks, e.g. ["sha1", "sha256"].
	PCRBanks []string `json:"pcr_banks"`
	// EventLog reports whether a firmware event log is available, and
	// if not, why not.
	EventLog     bool   `json:"event_log"`
	EventLogNote string `json:"event_log_note,omitempty"`
}

// Info reads the TPM's fixed properties and allocated PCR banks.
func (t *TPM) Info() (*Info, error) {
	log, err := t.EventLog()
	if err != nil {
		return nil, fmt.Errorf("tpm info: %w", err)
	}
	if err := t.lock(); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	vals, _, err := tpm2.GetCapability(t.rw, tpm2.CapabilityTPMProperties, uint32(tpm2.FirmwareVersion2-tpm2.FamilyIndicator)+1, uint32(tpm2.FamilyIndicator))
	if err != nil {
		return nil, fmt.Errorf("tpm info: read fixed properties: %w", err)
	}
	p := map[tpm2.TPMProp]uint32{}
	for _, v := range vals {
		if tp, ok := v.(tpm2.TaggedProperty); ok {
			p[tp.Tag] = tp.Value
		}
	}
	info := &Info{
		Kind:         t.kind,
		Spec:         t.spec,
		Manufacturer: ascii(p[tpm2.Manufacturer]),
		VendorString: ascii(p[tpm2.VendorString1], p[tpm2.VendorString2], p[tpm2.VendorString3], p[tpm2.VendorString4]),
		FirmwareVersion: fmt.Sprintf("%d.%d.%d.%d", p[tpm2.FirmwareVersion1]>>16, p[tpm2.FirmwareVersion1]&0xffff,
			p[tpm2.FirmwareVersion2]>>16, p[tpm2.FirmwareVersion2]&0xffff),
		FirmwareRaw:  fmt.Sprintf("0x%08x 0x%08x", p[tpm2.FirmwareVersion1], p[tpm2.FirmwareVersion2]),
		SpecVersion:  fmt.Sprintf("%s level %d revision %d.%02d", ascii(p[tpm2.FamilyIndicator]), p[tpm2.SpecLevel], p[tpm2.SpecRevision]/100, p[tpm2.SpecRevision]%100),
		EventLog:     log.Available,
		EventLogNote: log.Reason,
	}
	if y := p[tpm2.SpecYear]; y != 0 {
		info.SpecDate = fmt.Sprintf("%d day %d", y, p[tpm2.SpecDayOfYear])
	}
	banks, err := client.AllocatedPCRs(t.rw)
	if err != nil {
		return nil, fmt.Errorf("tpm info: %w", err)
	}
	for _, b := range banks {
		info.PCRBanks = append(info.PCRBanks, bankName(b.Hash))
	}
	slices.Sort(info.PCRBanks)
	return info, nil
}

// ascii decodes TPM properties that pack four characters into a uint32.
func ascii(words ...uint32) string {
	var b []byte
	for _, w := range words {
		b = binary.BigEndian.AppendUint32(b, w)
	}
	return strings.TrimRight(strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e {
			return -1
		}
		return r
	}, string(b)), " ")
}

func bankName(a tpm2.Algorithm) string {
	switch a {
	case tpm2.AlgSHA1:
		return "sha1"
	case tpm2.AlgSHA256:
		return "sha256"
	case tpm2.AlgSHA384:
		return "sha384"
	case tpm2.AlgSHA512:
		return "sha512"
	}
	return fmt.Sprintf("alg%#04x", uint16(a))
}
