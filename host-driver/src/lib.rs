//! A user-space NVMe host driver in the SPDK mould: no kernel block layer, polled
//! completions, DMA memory it owns (NVMe base 2.0 §3.5 bring-up, §5 admin commands, NVM
//! command set I/O).
//!
//! Layout: `dma.rs` DMA memory and its allocator; `transport/` how BAR0 and DMA mappings
//! are reached (vfio-user today); `controller.rs` bring-up, admin queue, Identify, queue
//! creation, reset and shutdown; `queue_pair.rs` I/O queue pairs: submit, PRPs, poll.

#![deny(unsafe_code)] // unsafe only in the modules marked `allow(unsafe_code)` below

pub mod controller;
// memory shared with the device
#[allow(unsafe_code)]
pub mod dma;
pub mod error;
// rings and doorbells in device-shared memory
#[allow(unsafe_code)]
pub mod queue_pair;
// BAR0 registers, IOMMU mappings, socket options
#[allow(unsafe_code)]
pub mod transport;

pub use controller::{NamespaceInfo, NvmeDriver};
pub use dma::{DmaBuffer, DmaMemory};
pub use error::DriverError;
pub use queue_pair::{IoQueuePair, Request};
pub use transport::Transport;
