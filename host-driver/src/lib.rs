//! A user-space NVMe host driver in the SPDK mould: no kernel block layer, polled
//! completions, DMA memory it owns (NVMe base 2.0 §3.5 bring-up, §5 admin commands, NVM
//! command set I/O).
//!
//! Layout: `dma.rs` DMA memory and its allocator; `transport/` how BAR0 and DMA mappings
//! are reached (vfio-user today); `controller.rs` bring-up, admin queue, Identify, queue
//! creation, reset and shutdown; `queue_pair.rs` I/O queue pairs: submit, PRPs, poll.

pub mod controller;
pub mod dma;
pub mod error;
pub mod queue_pair;
pub mod transport;

pub use controller::{Controller, NamespaceInfo};
pub use dma::{DmaBuffer, DmaMemory};
pub use error::DriverError;
pub use queue_pair::{IoQueuePair, Request};
pub use transport::Transport;
