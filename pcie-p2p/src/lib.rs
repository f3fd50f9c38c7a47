//! Data movement between an emulated controller and a real (or another emulated) NVMe
//! controller driven by `host-driver`.
//!
//! - `shared_device.rs`: one backend controller shared by every namespace backend on it
//!   (range claims, queue ids, guest-memory mirrors, health check and recovery reset);
//! - `registry.rs`: the shared devices of a process, by target;
//! - `nvme_backend.rs`: [`NvmeBackend`], a namespace (or LBA range) served from one queue
//!   pair, zero copy where the guest's segments allow it, bounced and counted otherwise.
//!
//! A device's Controller Memory Buffer is not used, by choice: with zero copy the data
//! never passes through a buffer of ours, so a CMB could only hold the bounce fallback or
//! the submission queues. Queues in a CMB save the device one SQE fetch, but VFIO maps BARs
//! uncached, so each 64-byte entry would cost the CPU posted MMIO writes instead of a cached
//! store; that trade only pays off with write-combining mappings, which VFIO does not give.

#![forbid(unsafe_code)]

mod nvme_backend;
mod registry;
mod shared_device;

pub use nvme_backend::{NvmeBackend, TransferStats};
pub use registry::DeviceRegistry;
pub use shared_device::{Claim, FAILED, SharedDevice};
