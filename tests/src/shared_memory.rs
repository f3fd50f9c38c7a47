//! A memfd of a given size mapped shared into this process: the "guest RAM" that test
//! clients hand to a server (DMA_MAP) or to a controller directly.

use std::os::fd::{FromRawFd, OwnedFd};

/// Create `size` bytes of shared memory named `name`; returns the fd and our mapping
/// (never unmapped: tests keep it for the process's life).
pub fn shared_memory(name: &std::ffi::CStr, size: u64) -> (OwnedFd, *mut u8) {
    // SAFETY: memfd_create with a C string; result checked.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(
        raw >= 0,
        "memfd_create: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: raw is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate and a shared mapping of our own memfd; results checked.
    let view = unsafe {
        assert_eq!(libc::ftruncate(raw, size as libc::off_t), 0, "ftruncate");
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            raw,
            0,
        )
    };
    assert_ne!(view, libc::MAP_FAILED, "mmap");
    (fd, view.cast())
}
