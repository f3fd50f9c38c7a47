//! Booting throw-away Linux guests under QEMU for end-to-end tests.
//!
//! A [`Guest`] describes one VM: the shell script it runs, QEMU's own NVMe controllers,
//! vfio-user devices (such as the vnvme server's socket), an IOMMU, port forwards and
//! files to copy in. [`Guest::run`] boots it and returns a [`GuestOutput`] with the serial
//! console and the script's exit status.
//!
//! The guest kernel, initramfs (busybox, nvme-cli, fio, lspci) and a QEMU with
//! `vfio-user-pci` come from the harness cache (`$VNVME_CACHE/harness`, default
//! `~/.cache/vnvme/harness`), which [`ensure_built`] creates on first use by running the
//! embedded `scripts/build-harness.sh` (needs root and a Debian mirror).
//!
//! Environment:
//! - `VNVME_ACCEL=tcg|kvm|auto`: the accelerator (see [`Accel::detect`]);
//! - `VNVME_GUEST_ECHO=1`: stream guest consoles to stderr;
//! - `VNVME_CACHE`: the cache directory.

#![deny(unsafe_code)] // unsafe only in `process` (process groups and signals)

mod accel;
mod cache;
mod cmdline;
mod console;
pub mod cpio;
mod error;
mod guest;
mod initrd;
// process groups and signals of the QEMU child
#[allow(unsafe_code)]
mod process;
mod progress;
mod runner;

pub use accel::{ACCEL_ENV, Accel, kvm_usable};
pub use cache::{CACHE_ENV, Harness, cache_dir, ensure_built};
pub use error::VmError;
pub use guest::{ECHO_ENV, Guest, GuestOutput};
