//! RAM in a memfd, so it can outlive the process that maps it: the RAM namespaces
//! (`malloc:`) of a supervised worker, whose supervisor keeps the memfds and hands them to
//! every next worker.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;

use memmap2::{MmapMut, MmapOptions, UncheckedAdvice};

/// A new memfd of `len` zeroed bytes named `name`, sealed against resizing (no memory is
/// used until written).
pub fn create(name: &CStr, len: u64) -> io::Result<OwnedFd> {
    crate::sealed_memfd(name, len, false)
}

/// Map all of `fd`, which must hold exactly `len` bytes, shared and writable.
pub fn map(fd: OwnedFd, len: u64) -> io::Result<MmapMut> {
    let file = File::from(fd);
    let size = file.metadata()?.len();
    if size != len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("kept RAM of {size} bytes where {len} were expected"),
        ));
    }
    let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a memfd that only this process maps while it runs: the supervisor that keeps
    // it holds the descriptor without mapping it, and hands it to one worker at a time, after
    // the one before has exited. Its size is sealed, so the mapping cannot lose its pages.
    unsafe { MmapOptions::new().len(len).map_mut(&file) }
}

/// Free the whole pages of `[offset, offset + len)` of a [`map`]ping (`MADV_REMOVE`: a hole
/// is punched in the memfd): they read as zeroes and use no memory until written again. The
/// range must be page aligned; false when the kernel refused (nothing changed then).
pub fn release_pages(map: &mut MmapMut, offset: usize, len: usize) -> bool {
    // SAFETY: `map` is borrowed exclusively, so no reference into it is alive while the
    // pages are punched out of the memfd (they read as zeroes after); memmap2 checks the
    // range against the mapping.
    unsafe { map.unchecked_advise_range(UncheckedAdvice::Remove, offset, len) }.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// What one mapping wrote, the next mapping of the same memfd reads; released pages
    /// read as zeroes; a size that does not match is refused.
    #[test]
    fn a_second_mapping_finds_what_the_first_wrote() {
        let fd = create(c"test-ram", 4 << 12).unwrap();
        let again = || fd.as_fd().try_clone_to_owned().unwrap();
        let mut m = map(again(), 4 << 12).unwrap();
        m[..4].copy_from_slice(b"kept");
        m[8192..8196].copy_from_slice(b"gone");
        assert!(release_pages(&mut m, 8192, 4096));
        drop(m);
        let m = map(again(), 4 << 12).unwrap();
        assert_eq!(&m[..4], b"kept");
        assert_eq!(&m[8192..8196], &[0; 4]);
        assert!(map(again(), 8 << 12).is_err());
    }
}
