//! The doorbell page: BAR0 0x1000-0x1fff lives in a memfd that the vfio-user client mmaps
//! (sparse mmap), so the guest rings doorbells with plain stores and the data plane polls them
//! here without any message or trap (NVMe base 2.0 §3.1.4.18; stride 4 bytes, CAP.DSTRD = 0).

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU32, Ordering};

use sys_util::SharedMemory;

use crate::pci::{BAR0_SIZE, DOORBELL_OFFSET, DOORBELL_SIZE};

/// Number of doorbell registers in the page (SQ tail / CQ head pairs).
pub const DOORBELLS: usize = (DOORBELL_SIZE / 4) as usize;

/// Shared BAR0 backing: a sealed memfd the size of BAR0; only its doorbell page is used.
#[derive(Debug)]
pub struct Doorbells {
    page: SharedMemory,
}

impl Doorbells {
    /// Create the memfd and map it. The client mmaps this file: it is sealed so the client
    /// can neither shrink it under our mapping (SIGBUS in the reactor) nor grow it.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            page: SharedMemory::new(c"vnvme-bar0", BAR0_SIZE)?,
        })
    }

    /// The BAR0 memfd a supervisor created and the client may have mapped already: the same
    /// file, so the doorbells the guest rings keep reaching us across worker processes.
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> std::io::Result<Self> {
        let page = SharedMemory::from_fd(fd, BAR0_SIZE)?;
        if page.len() as u64 != BAR0_SIZE {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        Ok(Self { page })
    }

    /// The memfd to hand to the client for mmap (region offset 0 = BAR0 offset 0).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.page.fd()
    }

    fn slot(&self, index: usize) -> &AtomicU32 {
        assert!(index < DOORBELLS);
        self.page.atomic_u32(DOORBELL_OFFSET as usize + index * 4)
    }

    /// Doorbell register `index` (SQ y tail = 2y, CQ y head = 2y + 1).
    pub fn load(&self, index: usize) -> u32 {
        self.slot(index).load(Ordering::Acquire)
    }

    /// Set doorbell register `index` (zeroed when its queue is created).
    pub fn store(&self, index: usize, value: u32) {
        self.slot(index).store(value, Ordering::Release);
    }

    /// A trapped doorbell write (client did not mmap): `offset` is relative to BAR0.
    /// Returns false when the offset is not a doorbell register.
    pub fn write(&self, offset: u64, value: u32) -> bool {
        let Some(rel) = offset.checked_sub(DOORBELL_OFFSET) else {
            return false;
        };
        if rel % 4 != 0 || rel >= DOORBELL_SIZE {
            return false;
        }
        self.store(rel as usize / 4, value);
        true
    }

    /// A trapped doorbell read (doorbells read back as the last value written).
    pub fn read(&self, offset: u64) -> Option<u32> {
        let rel = offset.checked_sub(DOORBELL_OFFSET)?;
        (rel % 4 == 0 && rel < DOORBELL_SIZE).then(|| self.load(rel as usize / 4))
    }

    /// Zero every doorbell (controller reset).
    pub fn clear(&self) {
        for i in 0..DOORBELLS {
            self.store(i, 0);
        }
    }
}
