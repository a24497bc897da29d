// Package testvm builds and runs a measured test guest for keygate: the
// Debian 6.1 kernel (fetched with apt-get download and extracted, never
// installed), an initramfs holding busybox-static, the kernel modules the
// guest needs, a small /init and a static keygate binary, booted by OVMF
// under QEMU (TCG) with swtpm as its vTPM. OVMF measures the firmware and the
// kernel, the kernel's EFI stub measures the initrd, and the guest sees the
// UEFI event log.
//
// The package owns the guest's build (Kernel, Initramfs), its lifetime (VM:
// swtpm and QEMU processes, kill on timeout) and its serial console protocol:
// the guest reports results as "KEYGATE-RESULT key=value" lines (see
// Console). It does not own what runs inside the guest beyond /init; the
// scenarios that drive keygate boot and the monitor live in this package's
// tests (TestScenarios: enroll and learn, unlock and serve, tampered boot,
// attack, revoke, erase, dm-crypt cross-check; TestDataPath: SQLite on
// ext4 over the NBD export and on the 9P export, killed mid-run and checked
// after a reboot, and ext4 on NBD against ext4 on dm-crypt).
//
// Fetched and built artefacts are cached under CacheDir (by default
// .cache/testvm at the module root, git-ignored), keyed by the Debian package
// version, so a clean clone rebuilds and a warm cache costs no download.
package testvm
