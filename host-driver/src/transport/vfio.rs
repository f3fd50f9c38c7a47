//! VFIO transport for a local PCI NVMe controller bound to `vfio-pci` (Linux
//! `include/uapi/linux/vfio.h`), on rust-vmm's `vfio-ioctls`: type1 IOMMU container, group,
//! device, BAR0 mmapped for registers and doorbells, bus mastering on, the driver's DMA
//! memory mapped with VFIO_IOMMU_MAP_DMA. vfio-ioctls' region accessors log errors instead
//! of returning them, so the PCI command register is read back to check the write took.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};

use super::Transport;
use crate::dma::DmaMemory;
use crate::error::DriverError;

/// PCI command register: memory space and bus master enable.
const PCI_COMMAND: u64 = 4;
const PCI_COMMAND_MEMORY_MASTER: u16 = 0x6;

/// A PCI NVMe controller bound to vfio-pci.
/// Fields drop in order: BAR0 unmapped before the device closes (a live mapping keeps the
/// group busy and it could not leave the container), the container last.
pub struct VfioTransport {
    bdf: String,
    /// BAR0, registers and doorbells; accessed only with volatile loads and stores.
    bar0: memmap2::MmapRaw,
    device: VfioDevice,
    container: Arc<VfioContainer>,
}

impl VfioTransport {
    /// Open `bdf` (DDDD:BB:DD.F): its IOMMU group must be viable (every device in it bound
    /// to vfio-pci or no driver).
    pub fn open(bdf: &str) -> Result<Self, DriverError> {
        let sysfs = format!("/sys/bus/pci/devices/{bdf}");
        if let Err(e) = std::fs::read_link(format!("{sysfs}/iommu_group")) {
            return Err(DriverError::Transport(format!(
                "{bdf}: no IOMMU group ({e}); is the IOMMU on and the device present?"
            )));
        }
        let vfio = |e: vfio_ioctls::VfioError| {
            DriverError::Transport(format!(
                "{bdf}: {e} (is it bound to vfio-pci, with every device of its IOMMU group?)"
            ))
        };
        let container = Arc::new(VfioContainer::new(None).map_err(vfio)?);
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(Path::new(&sysfs), ops, false).map_err(vfio)?;
        let (flags, size, offset) = (
            device.get_region_flags(0),
            device.get_region_size(0),
            device.get_region_offset(0),
        );
        if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || size < 0x2000 {
            return Err(DriverError::Transport(format!(
                "{bdf}: BAR0 ({size} bytes) cannot be mmapped"
            )));
        }
        let bar0 = memmap2::MmapOptions::new()
            .offset(offset)
            .len(size as usize)
            .map_raw(device.as_raw_fd())
            .map_err(|e| DriverError::Transport(format!("{bdf}: mmap BAR0: {e}")))?;
        let mut t = Self {
            bdf: bdf.to_string(),
            bar0,
            device,
            container,
        };
        t.enable_bus_master()?;
        Ok(t)
    }

    fn enable_bus_master(&mut self) -> Result<(), DriverError> {
        let mut cmd = [0u8; 2];
        self.device
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut cmd, PCI_COMMAND);
        let v = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY_MASTER;
        self.device
            .region_write(VFIO_PCI_CONFIG_REGION_INDEX, &v.to_le_bytes(), PCI_COMMAND);
        self.device
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut cmd, PCI_COMMAND);
        if u16::from_le_bytes(cmd) & PCI_COMMAND_MEMORY_MASTER != PCI_COMMAND_MEMORY_MASTER {
            return Err(DriverError::Transport(format!(
                "{}: cannot enable memory decoding and bus mastering (PCI command {:#06x})",
                self.bdf,
                u16::from_le_bytes(cmd)
            )));
        }
        Ok(())
    }

    /// VFIO_IOMMU_MAP_DMA of `len` bytes of our memory at `host` to device address `iova`.
    fn iommu_map(&self, host: *mut u8, iova: u64, len: u64) -> Result<(), DriverError> {
        let size = usize::try_from(len)
            .map_err(|_| DriverError::Invalid(format!("DMA mapping of {len} bytes")))?;
        // SAFETY: `host..host+len` is memory the device may own for DMA: the driver's DMA
        // memory or a guest's RAM mapped into this process, both shared mappings that this
        // process reaches only through raw pointers, atomics and copies (never references
        // held across device access), and both outlive the mapping (unmapped first).
        unsafe { self.container.vfio_dma_map(iova, size, host) }
            .map_err(|e| DriverError::Transport(format!("VFIO_IOMMU_MAP_DMA: {e}")))
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, DriverError> {
        let o = usize::try_from(offset).unwrap_or(usize::MAX);
        if o % len != 0 || o.checked_add(len).is_none_or(|end| end > self.bar0.len()) {
            return Err(DriverError::Invalid(format!(
                "BAR0 access of {len} bytes at {offset:#x} outside 0..{:#x}",
                self.bar0.len()
            )));
        }
        Ok(o)
    }
}

impl Transport for VfioTransport {
    fn read32(&mut self, offset: u64) -> Result<u32, DriverError> {
        let o = self.check(offset, 4)?;
        // SAFETY: o is 4-byte aligned and inside the BAR0 mapping (checked).
        #[allow(clippy::cast_ptr_alignment)]
        Ok(unsafe { std::ptr::read_volatile(self.bar0.as_ptr().add(o).cast::<u32>()) })
    }

    fn write32(&mut self, offset: u64, value: u32) -> Result<(), DriverError> {
        let o = self.check(offset, 4)?;
        // SAFETY: as in read32.
        #[allow(clippy::cast_ptr_alignment)]
        unsafe {
            std::ptr::write_volatile(self.bar0.as_mut_ptr().add(o).cast::<u32>(), value);
        }
        Ok(())
    }

    fn doorbells(&self) -> *mut u32 {
        // BAR0 is at least 0x2000 bytes (checked in open), so 0x1000 is inside it
        self.bar0.as_mut_ptr().wrapping_add(0x1000).cast()
    }

    fn map_dma(&mut self, mem: &DmaMemory) -> Result<(), DriverError> {
        self.iommu_map(mem.as_ptr(), mem.iova_base(), mem.size())
    }

    fn map_foreign(
        &mut self,
        _fd: std::os::fd::BorrowedFd<'_>,
        _file_offset: u64,
        host: *mut u8,
        iova: u64,
        len: u64,
    ) -> Result<(), DriverError> {
        self.iommu_map(host, iova, len)
    }

    fn unmap_foreign(&mut self, iova: u64, len: u64) -> Result<(), DriverError> {
        let size = usize::try_from(len)
            .map_err(|_| DriverError::Invalid(format!("DMA unmapping of {len} bytes")))?;
        self.container
            .vfio_dma_unmap(iova, size)
            .map_err(|e| DriverError::Transport(format!("VFIO_IOMMU_UNMAP_DMA: {e}")))
    }

    fn before_reset(&mut self) -> Result<(), DriverError> {
        self.enable_bus_master()
    }

    fn name(&self) -> String {
        format!("pci:{}", self.bdf)
    }
}
