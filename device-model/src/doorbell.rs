//! The doorbell page: BAR0 0x1000-0x1fff lives in a memfd that the vfio-user client mmaps
//! (sparse mmap), so the guest rings doorbells with plain stores and the data plane polls them
//! here without any message or trap (NVMe base 2.0 §3.1.4.18; stride 4 bytes, CAP.DSTRD = 0).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::pci::{BAR0_SIZE, DOORBELL_OFFSET, DOORBELL_SIZE};

/// Number of doorbell registers in the page (SQ tail / CQ head pairs).
pub const DOORBELLS: usize = (DOORBELL_SIZE / 4) as usize;

/// Shared BAR0 backing: a memfd the size of BAR0; only its doorbell page is used.
pub struct Doorbells {
    fd: OwnedFd,
    base: *mut u8,
}

impl std::fmt::Debug for Doorbells {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doorbells")
            .field("fd", &self.fd.as_raw_fd())
            .finish()
    }
}

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for Doorbells {}
// SAFETY: as above.
unsafe impl Sync for Doorbells {}

impl Doorbells {
    /// Create the memfd and map it.
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: memfd_create with a static C string; result checked.
        let raw = unsafe {
            libc::memfd_create(
                c"vnvme-bar0".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own descriptor.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), BAR0_SIZE as i64) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // the client mmaps this file: sealed so it can neither shrink it under our mapping
        // (SIGBUS in the reactor) nor grow it
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl(F_ADD_SEALS) on our own memfd with an integer argument.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: shared mapping of our memfd, checked; unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BAR0_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { fd, base: p.cast() })
    }

    /// The memfd to hand to the client for mmap (region offset 0 = BAR0 offset 0).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn slot(&self, index: usize) -> &AtomicU32 {
        assert!(index < DOORBELLS);
        #[allow(clippy::cast_ptr_alignment)]
        // the mapping is page aligned and offsets are multiples of 4
        // SAFETY: index is within the doorbell page of our mapping, 4-byte aligned; AtomicU32
        // has the layout of u32 and the memory lives as long as self.
        unsafe {
            &*self
                .base
                .add(DOORBELL_OFFSET as usize + index * 4)
                .cast::<AtomicU32>()
        }
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

impl Drop for Doorbells {
    fn drop(&mut self) {
        // SAFETY: base/BAR0_SIZE came from mmap in new().
        unsafe { libc::munmap(self.base.cast(), BAR0_SIZE as usize) };
    }
}
