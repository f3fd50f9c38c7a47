//! Data movement between an emulated controller and a real (or another emulated) NVMe
//! controller driven by `host-driver`: [`NvmeBackend`] serves a namespace's blocks from a
//! namespace of that controller.
//!
//! This first version moves data through bounce buffers in the driver's DMA memory and
//! counts every byte it bounces ([`TransferStats`]); zero-copy (mirroring the guest's
//! memory into the backend device's address space) builds on it.

mod nvme_backend;

pub use nvme_backend::{NvmeBackend, TransferStats};
