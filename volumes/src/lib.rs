//! Storage services: backends made of backends. Everything that takes a
//! [`Backend`](device_model::backend::Backend) takes an array.
//!
//! - [`raid`]: concat, RAID 0, RAID 1 and RAID 10 over any member backends (RAM, files,
//!   local SSDs, remote NVMe/TCP namespaces), with a superblock on every member, a
//!   write-intent bitmap for the mirrored levels and a background, rate-limited rebuild.
//! - [`lvol`]: logical volumes in a volume store: thin provisioning, snapshots, clones,
//!   copy-on-write, crash-consistent metadata.

#![forbid(unsafe_code)]
// rates, percents and ETAs are shown as floats: a rounding there is harmless
#![allow(clippy::cast_precision_loss)]

pub mod lvol;
pub mod raid;
