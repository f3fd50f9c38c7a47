//! PCI side of the controller: configuration space and BAR layout.

mod config;
mod sriov;

pub use config::{ConfigSpace, ConfigWrite, PciIds};
pub use sriov::{SriovShape, VfChange};

/// BAR0: controller registers (0x0-0xfff) and doorbells (0x1000-0x1fff), 16 KiB.
pub const BAR0_SIZE: u64 = 0x4000;
/// Offset of the doorbell page inside BAR0 (NVMe base 2.0 §3.1.4.18).
pub const DOORBELL_OFFSET: u64 = 0x1000;
/// Size of the doorbell page (128 queue pairs * 8 bytes fit in 4 KiB).
pub const DOORBELL_SIZE: u64 = 0x1000;
/// BAR4: MSI-X table at 0 and PBA at [`MSIX_PBA_OFFSET`], 8 KiB.
pub const BAR4_SIZE: u64 = 0x2000;
/// Offset of the MSI-X PBA in BAR4.
pub const MSIX_PBA_OFFSET: u64 = 0x1000;
/// MSI-X vectors: one for the admin queue and one per I/O queue (NVMe base 2.0 §3.1.3).
pub const MSIX_VECTORS: u16 = 129;
/// Configuration space size (PCI Express: 4 KiB).
pub const CONFIG_SIZE: u64 = 0x1000;
