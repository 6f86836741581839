//! The bootable keel appliance image for compute hosts.
//!
//! # Design
//! - [`cpio`]: a reproducible newc writer ([`cpio::CpioTree`] sorts entries,
//!   fixes ownership and mtimes) shared by the appliance image and the test
//!   guest image in `keel-testkit`.
//! - [`kernel`]: finding Debian's kernel and resolving modules through
//!   `modules.dep`.
//!
//! # Assumptions
//! The build host runs Debian 12 with the packages `keel.sh` lists
//! (linux-image-amd64, busybox-static, ...): every file in an image comes
//! from an installed Debian package or from keel itself.

pub mod appliance;
pub mod cpio;
pub mod disk;
pub mod guest_firmware;
pub mod kernel;
