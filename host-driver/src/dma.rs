//! DMA memory the driver owns: one memfd, 2 MiB hugepages when the system has them
//! (MFD_HUGETLB), 4 KiB pages otherwise, mapped at IOVA `iova_base` for the device and at
//! some address for us. A first-fit page allocator hands out buffers with their IOVA.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use crate::error::DriverError;

/// Allocation granule.
pub const PAGE: u64 = 4096;
const HUGE_PAGE: u64 = 2 << 20;

/// The driver's DMA memory.
pub struct DmaMemory {
    fd: OwnedFd,
    base: *mut u8,
    size: u64,
    iova_base: u64,
    hugepages: bool,
    /// Free ranges (offset, length) in pages units of bytes, sorted by offset.
    free: Mutex<Vec<(u64, u64)>>,
}

impl std::fmt::Debug for DmaMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaMemory")
            .field("size", &self.size)
            .field("iova_base", &self.iova_base)
            .field("hugepages", &self.hugepages)
            .finish_non_exhaustive()
    }
}

// SAFETY: the mapping is plain shared memory; the allocator state is behind a Mutex and each
// buffer is handed to exactly one owner.
unsafe impl Send for DmaMemory {}
// SAFETY: as above.
unsafe impl Sync for DmaMemory {}

fn memfd(huge: bool) -> std::io::Result<OwnedFd> {
    let flags =
        libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | if huge { libc::MFD_HUGETLB } else { 0 };
    // SAFETY: memfd_create with a static C string; result checked.
    let fd = unsafe { libc::memfd_create(c"vnvme-dma".as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl DmaMemory {
    /// `size` bytes (rounded up to 2 MiB) of DMA memory at device address `iova_base`.
    pub fn new(size: u64, iova_base: u64) -> Result<Arc<Self>, DriverError> {
        let size = size.div_ceil(HUGE_PAGE) * HUGE_PAGE;
        for huge in [true, false] {
            let Ok(fd) = memfd(huge) else { continue };
            // SAFETY: ftruncate on our own memfd.
            if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
                continue;
            }
            // the vfio-user server we hand this to maps it: it may not resize it
            // SAFETY: fcntl(F_ADD_SEALS) on our own memfd with an integer argument.
            unsafe {
                libc::fcntl(
                    fd.as_raw_fd(),
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
                )
            };
            // SAFETY: a fresh shared mapping of our memfd, checked; unmapped in Drop.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_POPULATE,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                // hugetlb memfds fail here when no hugepages are reserved
                continue;
            }
            log::debug!(
                "DMA memory: {} MiB, {} pages",
                size >> 20,
                if huge { "2 MiB" } else { "4 KiB" }
            );
            return Ok(Arc::new(Self {
                fd,
                base: p.cast(),
                size,
                iova_base,
                hugepages: huge,
                free: Mutex::new(vec![(0, size)]),
            }));
        }
        Err(DriverError::Dma(format!(
            "cannot create {size} bytes of shared memory: {}",
            std::io::Error::last_os_error()
        )))
    }

    /// The memfd (for the transport's DMA mapping).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Our address of offset 0 (for an IOMMU mapping of the whole region).
    pub fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    /// Device address of offset 0.
    pub fn iova_base(&self) -> u64 {
        self.iova_base
    }

    /// True when backed by 2 MiB hugepages.
    pub fn hugepages(&self) -> bool {
        self.hugepages
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
        // SAFETY: [off, off+len) is inside our mapping and now owned by this buffer alone.
        unsafe { std::ptr::write_bytes(self.base.add(off as usize), 0, len as usize) };
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

impl Drop for DmaMemory {
    fn drop(&mut self) {
        // SAFETY: base/size came from mmap in new().
        unsafe { libc::munmap(self.base.cast(), self.size as usize) };
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

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the range lies in the live mapping and belongs to this buffer; the device
        // may write it concurrently, which callers order by completions.
        unsafe {
            std::slice::from_raw_parts(self.mem.base.add(self.offset as usize), self.len as usize)
        }
    }

    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access on our side.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.mem.base.add(self.offset as usize),
                self.len as usize,
            )
        }
    }

    /// Raw pointer to the first byte (queue rings poll it with volatile reads).
    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: offset is inside the mapping.
        unsafe { self.mem.base.add(self.offset as usize) }
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
