//! How the driver reaches a controller: BAR0 registers, the doorbell page mapped into our
//! address space, and DMA mappings of our memory.

pub mod vfio;
pub mod vfio_user;

use crate::dma::DmaMemory;
use crate::error::DriverError;

/// A controller's BAR0 and DMA mapping.
pub trait Transport: Send {
    /// Read a 32-bit register.
    fn read32(&mut self, offset: u64) -> Result<u32, DriverError>;
    /// Write a 32-bit register.
    fn write32(&mut self, offset: u64, value: u32) -> Result<(), DriverError>;
    /// Read a 64-bit register (CAP).
    fn read64(&mut self, offset: u64) -> Result<u64, DriverError> {
        let lo = self.read32(offset)?;
        let hi = self.read32(offset + 4)?;
        Ok(u64::from(lo) | (u64::from(hi) << 32))
    }
    /// Write a 64-bit register (ASQ, ACQ) as two 32-bit writes, low first.
    fn write64(&mut self, offset: u64, value: u64) -> Result<(), DriverError> {
        self.write32(offset, value as u32)?;
        self.write32(offset + 4, (value >> 32) as u32)
    }
    /// The doorbell page (BAR0 0x1000..) mapped into our address space.
    fn doorbells(&self) -> *mut u32;
    /// Let the device reach `mem` at its IOVA.
    fn map_dma(&mut self, mem: &DmaMemory) -> Result<(), DriverError>;
    /// Let the device reach memory that is not ours (a guest's RAM that a vfio-user client
    /// mapped into this process) at `iova`: `len` bytes of `fd` from `file_offset`, mapped
    /// here at `host`. Zero-copy backends use `iova == host`.
    fn map_foreign(
        &mut self,
        fd: std::os::fd::BorrowedFd<'_>,
        file_offset: u64,
        host: *mut u8,
        iova: u64,
        len: u64,
    ) -> Result<(), DriverError>;
    /// Undo [`Self::map_foreign`].
    fn unmap_foreign(&mut self, iova: u64, len: u64) -> Result<(), DriverError>;
    /// Before a controller reset: make sure the function decodes memory and may master
    /// DMA again (a function-level reset behind our back clears the PCI command register,
    /// after which register writes are dropped). No-op where that cannot happen.
    fn before_reset(&mut self) -> Result<(), DriverError> {
        Ok(())
    }
    /// Human-readable target name.
    fn name(&self) -> String;
}
