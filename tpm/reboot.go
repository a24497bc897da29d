package tpm

import "fmt"

// Reboot restarts the in-process simulator as a host reboot would: the PCRs
// return to their reset values and transient objects are gone, while the
// seeds, and so the EK, are kept. It lets tests and `keygate demo` boot the
// same machine twice in one process. Other TPMs are rebooted with their
// host (or, for swtpm, by restarting it on its state directory).
func (t *TPM) Reboot() error {
	if err := t.lock(); err != nil {
		return err
	}
	defer t.mu.Unlock()
	r, ok := t.rw.(interface{ Reset() error })
	if !ok {
		return fmt.Errorf("reboot TPM %s: only the in-process simulator reboots from here; reboot the machine, or restart swtpm on the same --tpmstate", t.spec)
	}
	if err := r.Reset(); err != nil {
		return fmt.Errorf("reboot TPM %s: %w", t.spec, err)
	}
	return nil
}
