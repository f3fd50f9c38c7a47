//! Memory the daemon shares with another party: a memfd sealed against resizing, mapped
//! once with memmap2. The BAR0 doorbell page a vfio-user client mmaps, the host driver's
//! DMA memory a device or a vfio-user server maps, the NVMe/TCP target's host memory.
//!
//! The other party may write the memory at any time, so it is never handed out as a Rust
//! reference to bytes: only as atomics, as copies in and out, or as a raw pointer for a
//! device or a kernel interface.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::AtomicU32;

use memmap2::{MmapOptions, MmapRaw};

/// A memfd of `len` zeroed bytes named `name`, sealed against shrinking, growing and
/// further seals (memfd_create(2), F_ADD_SEALS): whoever else maps it cannot truncate it
/// under a mapping of ours (SIGBUS). `hugetlb` backs it with 2 MiB hugepages.
pub fn sealed_memfd(name: &CStr, len: u64, hugetlb: bool) -> io::Result<OwnedFd> {
    let flags =
        libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | if hugetlb { libc::MFD_HUGETLB } else { 0 };
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    file.set_len(len)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl(F_ADD_SEALS) with an integer argument on a descriptor we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file.into())
}

/// How to back and map a [`SharedMemory`].
#[derive(Clone, Copy, Debug, Default)]
pub struct SharedMemoryOptions {
    /// Back it with 2 MiB hugepages (`MFD_HUGETLB`); fails when none are reserved.
    pub hugetlb: bool,
    /// Fault every page in at map time (`MAP_POPULATE`).
    pub populate: bool,
}

/// A sealed memfd and our shared mapping of all of it.
#[derive(Debug)]
pub struct SharedMemory {
    file: File,
    map: MmapRaw,
    hugetlb: bool,
}

impl SharedMemory {
    /// `len` bytes of zeroed shared memory named `name` (shown in `/proc/PID/maps`).
    pub fn new(name: &CStr, len: u64) -> io::Result<Self> {
        Self::with_options(name, len, SharedMemoryOptions::default())
    }

    /// As [`new`](Self::new), with options; the memfd is a [`sealed_memfd`].
    pub fn with_options(name: &CStr, len: u64, opts: SharedMemoryOptions) -> io::Result<Self> {
        let size =
            usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let file = File::from(sealed_memfd(name, len, opts.hugetlb)?);
        let mut o = MmapOptions::new();
        o.len(size);
        if opts.populate {
            o.populate();
        }
        let map = o.map_raw(&file)?;
        Ok(Self {
            file,
            map,
            hugetlb: opts.hugetlb,
        })
    }

    /// Map all of an existing memfd (one another process created and passed on: the BAR0
    /// page a client already mapped, a state memfd). Its size is taken from `fstat`; a file
    /// of 0 bytes or of more than `max_len` bytes is refused.
    pub fn from_fd(fd: OwnedFd, max_len: u64) -> io::Result<Self> {
        let file = File::from(fd);
        let len = file.metadata()?.len();
        if len == 0 || len > max_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("shared memory file of {len} bytes (expected 1..={max_len})"),
            ));
        }
        let map = MmapOptions::new().len(len as usize).map_raw(&file)?;
        Ok(Self {
            file,
            map,
            hugetlb: false,
        })
    }

    /// The memfd, to pass to the other party.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True for a zero-length mapping (never: memfds are created with a size).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// True when backed by hugepages.
    pub fn hugetlb(&self) -> bool {
        self.hugetlb
    }

    /// Our address of byte 0, for a device's or the kernel's use (IOMMU map, iovecs).
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Panics unless `offset..offset + len` lies inside the mapping (the test inlined, the
    /// panic out of line).
    #[allow(clippy::inline_always)] // a call per access otherwise (callgrind)
    #[inline(always)]
    fn check(&self, offset: usize, len: usize) {
        if offset.checked_add(len).is_none_or(|end| end > self.len()) {
            self.outside(offset, len);
        }
    }

    #[cold]
    #[inline(never)]
    fn outside(&self, offset: usize, len: usize) -> ! {
        panic!(
            "shared memory access {offset:#x}+{len:#x} outside {:#x} bytes",
            self.len()
        );
    }

    /// The 32-bit word at `offset` as an atomic (doorbells). Panics when `offset` is not
    /// 4-byte aligned or not inside the mapping.
    #[inline]
    pub fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        self.check(offset, 4);
        assert_eq!(offset % 4, 0, "unaligned atomic at {offset:#x}");
        // SAFETY: in bounds and 4-byte aligned (the mapping is page aligned); AtomicU32 has
        // u32's layout and tolerates concurrent writes by the other party; the mapping lives
        // as long as `self`.
        #[allow(clippy::cast_ptr_alignment)]
        unsafe {
            &*self.as_ptr().add(offset).cast::<AtomicU32>()
        }
    }

    /// Copy `buf.len()` bytes at `offset` out. Panics outside the mapping.
    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        self.check(offset, buf.len());
        // SAFETY: the source range is inside our live mapping and `buf` is our own memory;
        // the ranges cannot overlap. A concurrent writer can only tear the copied bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(offset), buf.as_mut_ptr(), buf.len());
        }
    }

    /// Copy `data` in at `offset`. Panics outside the mapping.
    pub fn write(&self, offset: usize, data: &[u8]) {
        self.check(offset, data.len());
        // SAFETY: as in `read`, with the roles of the ranges swapped.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), data.len());
        }
    }

    /// Copy the `N` bytes of `data` in at `offset` (a size known at compile time: a few
    /// plain stores, inlined across crates; the state journal's hot path). Panics outside
    /// the mapping.
    #[inline]
    pub fn write_array<const N: usize>(&self, offset: usize, data: &[u8; N]) {
        self.check(offset, N);
        // SAFETY: as in `write`; N bytes inside our live mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), N);
        }
    }

    /// The `N` bytes at `offset` (4-byte aligned) as a [`Window`]: bounds checked once here,
    /// so the stores into it at constant offsets compile to plain moves. Panics outside the
    /// mapping or when unaligned.
    #[inline]
    pub fn window<const N: usize>(&self, offset: usize) -> Window<'_, N> {
        self.check(offset, N);
        assert_eq!(offset % 4, 0, "unaligned window at {offset:#x}");
        Window {
            // SAFETY: `offset + N` is inside our live mapping (checked above).
            ptr: unsafe { self.as_ptr().add(offset) },
            _memory: std::marker::PhantomData,
        }
    }

    /// Set `len` bytes at `offset` to `byte`. Panics outside the mapping.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) {
        self.check(offset, len);
        // SAFETY: the range is inside our live mapping.
        unsafe { std::ptr::write_bytes(self.as_ptr().add(offset), byte, len) };
    }
}

/// `N` bytes of a [`SharedMemory`], checked once ([`SharedMemory::window`]): a record the
/// daemon writes with plain stores on a hot path (the state journal).
#[derive(Debug)]
pub struct Window<'a, const N: usize> {
    ptr: *mut u8,
    _memory: std::marker::PhantomData<&'a SharedMemory>,
}

impl<const N: usize> Window<'_, N> {
    /// Store `v` at byte `at` of the window with Release ordering (after every store before
    /// it; a plain `mov` on x86). `at` is usually a constant: its check then costs nothing.
    #[inline]
    pub fn store_u32(&self, at: usize, v: u32) {
        assert!(
            at + 4 <= N && at.is_multiple_of(4),
            "store at {at} in a {N}-byte window"
        );
        // SAFETY: in bounds of the window (checked above and when it was made) and 4-byte
        // aligned (the window is); the mapping outlives the window's borrow; AtomicU32 has
        // u32's layout and tolerates the other party's accesses.
        unsafe { AtomicU32::from_ptr(self.ptr.add(at).cast()) }
            .store(v, std::sync::atomic::Ordering::Release);
    }

    /// Load the 32-bit word at byte `at` of the window (Acquire).
    #[inline]
    pub fn load_u32(&self, at: usize) -> u32 {
        assert!(
            at + 4 <= N && at.is_multiple_of(4),
            "load at {at} in a {N}-byte window"
        );
        // SAFETY: as in `store_u32`.
        unsafe { AtomicU32::from_ptr(self.ptr.add(at).cast()) }
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Copy `data` in at byte `at` of the window.
    #[inline]
    pub fn write_array<const M: usize>(&self, at: usize, data: &[u8; M]) {
        assert!(at + M <= N, "{M} bytes at {at} in a {N}-byte window");
        // SAFETY: in bounds of the window (checked above); `data` is our own memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(at), M) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn sealed_against_resize_and_shared_through_the_fd() {
        let m = SharedMemory::new(c"test", 8192).unwrap();
        let f = File::from(m.fd().try_clone_to_owned().unwrap());
        assert!(f.set_len(4096).is_err(), "F_SEAL_SHRINK");
        assert!(f.set_len(16384).is_err(), "F_SEAL_GROW");
        m.atomic_u32(4096).store(0xdead_beef, Ordering::Release);
        let mut back = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 4096).unwrap();
        assert_eq!(u32::from_ne_bytes(back), 0xdead_beef);
        m.write(10, b"abc");
        let mut out = [0u8; 3];
        m.read(10, &mut out);
        assert_eq!(&out, b"abc");
        m.fill(10, 3, 0);
        m.read(10, &mut out);
        assert_eq!(out, [0; 3]);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn out_of_range_access_panics() {
        SharedMemory::new(c"test", 4096).unwrap().atomic_u32(4096);
    }
}
