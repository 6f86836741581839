//! The bootable keel appliance image for compute hosts, and the boot
//! firmware of guests.
//!
//! # Design
//! - [`appliance`]: `keel image build`: the kernel + initramfs pair with an
//!   iPXE script, reproducible; [`disk`]: the GPT disk image (ESP with
//!   signed shim + GRUB or systemd-boot, empty ext4 state partition) that
//!   also boots on legacy BIOS ([`bios_boot`]: GRUB i386-pc).
//! - [`guest_firmware`]: BIOS (SeaBIOS) or UEFI (OVMF, secure boot on/off)
//!   for a guest, and its per-VM NVRAM created from the template.
//! - [`cpio`]: a reproducible newc writer ([`cpio::CpioTree`] sorts entries,
//!   fixes ownership and mtimes) shared by the appliance image and the test
//!   guest image in `keel-testkit`.
//! - [`kernel`]: finding Debian's kernel and resolving modules through
//!   `modules.dep`.
//!
//! See `firmware/README.md` for the boot flow, kernel options, hardening
//! and reproducibility rules.
//!
//! # Threading model
//! None: builds run on the caller's thread, one external tool at a time.
//!
//! # Assumptions
//! The build host runs Debian 12 with the packages `keel.sh` lists
//! (linux-image-amd64, busybox-static, ...): every file in an image comes
//! from an installed Debian package or from keel itself.

pub mod appliance;
pub mod bios_boot;
pub mod cpio;
pub mod disk;
pub mod guest_firmware;
pub mod kernel;
pub mod qemu;
