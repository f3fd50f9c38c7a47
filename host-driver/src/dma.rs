//! DMA memory the driver owns: one memfd, 2 MiB hugepages when the system has them
//! (MFD_HUGETLB), 4 KiB pages otherwise, mapped at IOVA `iova_base` for the device and at
//! some address for us. A first-fit page allocator hands out buffers with their IOVA.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};

use sys_util::{SharedMemory, SharedMemoryOptions};

use crate::error::DriverError;

/// Allocation granule.
pub const PAGE: u64 = 4096;
const HUGE_PAGE: u64 = 2 << 20;

/// The driver's DMA memory.
pub struct DmaMemory {
    mem: SharedMemory,
    size: u64,
    iova_base: u64,
    /// Free ranges (offset, length) in pages units of bytes, sorted by offset.
    free: Mutex<Vec<(u64, u64)>>,
}

impl std::fmt::Debug for DmaMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaMemory")
            .field("size", &self.size)
            .field("iova_base", &self.iova_base)
            .field("hugepages", &self.mem.hugetlb())
            .finish_non_exhaustive()
    }
}

impl DmaMemory {
    /// `size` bytes (rounded up to 2 MiB) of DMA memory at device address `iova_base`.
    pub fn new(size: u64, iova_base: u64) -> Result<Arc<Self>, DriverError> {
        let size = size.div_ceil(HUGE_PAGE) * HUGE_PAGE;
        let mut last = None;
        for hugetlb in [true, false] {
            // the vfio-user server or device we hand this to may not resize it (sealed);
            // hugetlb memfds fail to map when no hugepages are reserved
            let opts = SharedMemoryOptions {
                hugetlb,
                populate: true,
            };
            match SharedMemory::with_options(c"vnvme-dma", size, opts) {
                Ok(mem) => {
                    log::debug!(
                        "DMA memory: {} MiB, {} pages",
                        size >> 20,
                        if hugetlb { "2 MiB" } else { "4 KiB" }
                    );
                    return Ok(Arc::new(Self {
                        mem,
                        size,
                        iova_base,
                        free: Mutex::new(vec![(0, size)]),
                    }));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(DriverError::Dma(format!(
            "cannot create {size} bytes of shared memory: {}",
            last.map_or_else(String::new, |e| e.to_string())
        )))
    }

    /// The memfd (for the transport's DMA mapping).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.mem.fd()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Our address of offset 0 (for an IOMMU mapping of the whole region).
    pub fn as_ptr(&self) -> *mut u8 {
        self.mem.as_ptr()
    }

    /// Device address of offset 0.
    pub fn iova_base(&self) -> u64 {
        self.iova_base
    }

    /// True when backed by 2 MiB hugepages.
    pub fn hugepages(&self) -> bool {
        self.mem.hugetlb()
    }

    /// A zeroed, page-aligned buffer of at least `len` bytes.
    pub fn alloc(self: &Arc<Self>, len: u64) -> Result<DmaBuffer, DriverError> {
        let len = len.max(1).div_ceil(PAGE) * PAGE;
        let mut free = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(i) = free.iter().position(|&(_, l)| l >= len) else {
            return Err(DriverError::Dma(format!(
                "out of DMA memory ({len} bytes wanted of {})",
                self.size
            )));
        };
        let (off, l) = free[i];
        if l == len {
            free.remove(i);
        } else {
            free[i] = (off + len, l - len);
        }
        drop(free);
        self.mem.fill(off as usize, len as usize, 0);
        Ok(DmaBuffer {
            mem: Arc::clone(self),
            offset: off,
            len,
        })
    }

    fn release(&self, off: u64, len: u64) {
        let mut free = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = free.partition_point(|&(o, _)| o < off);
        free.insert(i, (off, len));
        // merge with neighbours
        if i + 1 < free.len() && free[i].0 + free[i].1 == free[i + 1].0 {
            free[i].1 += free[i + 1].1;
            free.remove(i + 1);
        }
        if i > 0 && free[i - 1].0 + free[i - 1].1 == free[i].0 {
            free[i - 1].1 += free[i].1;
            free.remove(i);
        }
    }
}

/// A buffer in DMA memory: its bytes for us, its IOVA for the device.
pub struct DmaBuffer {
    mem: Arc<DmaMemory>,
    offset: u64,
    len: u64,
}

impl std::fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBuffer")
            .field("iova", &self.iova())
            .field("len", &self.len)
            .finish()
    }
}

impl DmaBuffer {
    /// Device address of the first byte.
    pub fn iova(&self) -> u64 {
        self.mem.iova_base + self.offset
    }

    /// Length in bytes (a multiple of 4 KiB).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never empty; for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copy bytes at `offset` of the buffer out (for memory the device may be writing now,
    /// such as a completion ring). Panics outside the buffer.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(
            offset + out.len() <= self.len as usize,
            "outside the DMA buffer"
        );
        self.mem.mem.read(self.offset as usize + offset, out);
    }

    /// Copy the `N` bytes of `data` in at `offset` (a submission queue entry): a copy of a
    /// constant size, inlined. Panics outside the buffer.
    #[allow(clippy::inline_always)] // once per command on a forwarding hop (callgrind)
    #[inline(always)]
    pub fn write_array<const N: usize>(&self, offset: usize, data: &[u8; N]) {
        assert!(offset + N <= self.len as usize, "outside the DMA buffer");
        self.mem
            .mem
            .write_array(self.offset as usize + offset, data);
    }

    /// Copy `data` in at `offset` of the buffer (a submission ring the device reads).
    /// Panics outside the buffer.
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(
            offset + data.len() <= self.len as usize,
            "outside the DMA buffer"
        );
        self.mem.mem.write(self.offset as usize + offset, data);
    }

    /// The bytes, for a data buffer no command in flight references (the device touches a
    /// data buffer only between submission and completion of a command that names it).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the range lies in the live mapping and belongs to this buffer; per the
        // contract above the device does not write it while the reference lives.
        unsafe {
            std::slice::from_raw_parts(
                self.mem.as_ptr().add(self.offset as usize),
                self.len as usize,
            )
        }
    }

    /// The bytes, mutable, under the same contract as [`as_slice`](Self::as_slice).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access on our side.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.mem.as_ptr().add(self.offset as usize),
                self.len as usize,
            )
        }
    }

    /// Raw pointer to the first byte (queue rings poll it with volatile reads).
    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: offset is inside the mapping.
        unsafe { self.mem.as_ptr().add(self.offset as usize) }
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        self.mem.release(self.offset, self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_merge() {
        let m = DmaMemory::new(2 << 20, 0x1000_0000).unwrap();
        let a = m.alloc(1).unwrap();
        let b = m.alloc(8192).unwrap();
        assert_eq!(a.len(), 4096);
        assert_eq!(b.iova(), a.iova() + 4096);
        assert!(m.alloc(4 << 20).is_err());
        drop(a);
        drop(b);
        let all = m.alloc(2 << 20).unwrap();
        assert_eq!(all.iova(), 0x1000_0000, "free ranges merged back");
    }
}
