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

/// Map `[offset, offset + len)` of memfd `fd` shared and writable (a namespace of a kept
/// pool: one memfd, a range per namespace). `offset` must be page aligned and the range
/// within the file.
pub fn map_range(fd: std::os::fd::BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<MmapMut> {
    let file = File::from(fd.try_clone_to_owned()?);
    let size = file.metadata()?.len();
    let page = crate::anonymous::page_size() as u64;
    if len == 0 || !offset.is_multiple_of(page) || offset.checked_add(len).is_none_or(|e| e > size)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} of kept RAM of {size} bytes"),
        ));
    }
    let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: as in `map`: a memfd only this process maps while it runs (its supervisor
    // holds it unmapped), its size sealed; the range was checked against that size.
    unsafe { MmapOptions::new().offset(offset).len(len).map_mut(&file) }
}

/// Punch `[offset, offset + len)` out of memfd `fd` (`fallocate(PUNCH_HOLE)`): it reads as
/// zeroes and uses no memory until written again. A namespace of a kept pool starts zeroed,
/// and gives its memory back when deleted.
pub fn punch(fd: std::os::fd::BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate(2) on a descriptor we borrow, with integer arguments only.
    if unsafe { libc::fallocate(fd.as_raw_fd(), mode, off, n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The ranges of `[start, end)` of memfd `fd` that hold data (`lseek(SEEK_DATA/SEEK_HOLE)`):
/// what was ever written and not punched since; the rest reads as zeroes without memory.
pub fn data_ranges(
    fd: std::os::fd::BorrowedFd<'_>,
    start: u64,
    end: u64,
) -> io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let seek = |at: u64, whence: i32| -> io::Result<Option<u64>> {
        let at = i64::try_from(at).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: lseek(2) on a descriptor we borrow, integer arguments only (it moves the
        // file offset, which nothing of ours reads: kept RAM is mapped or read at offsets).
        let r = unsafe { libc::lseek(fd.as_raw_fd(), at, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        // ENXIO: no data from there to the end
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    };
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let Some(data) = seek(at, libc::SEEK_DATA)?.filter(|&d| d < end) else {
            break;
        };
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        out.push((data, hole));
        at = hole.max(data + 1);
    }
    Ok(out)
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

    /// A range of a large sparse memfd is a namespace of its own; punched, it reads as zeroes.
    #[test]
    fn ranges_of_one_memfd_and_punched_holes() {
        let fd = create(c"test-pool", 1 << 40).unwrap();
        let mut a = map_range(fd.as_fd(), 3 << 30, 1 << 20).unwrap();
        a[4096..4100].copy_from_slice(b"pool");
        drop(a);
        let b = map_range(fd.as_fd(), 3 << 30, 1 << 20).unwrap();
        assert_eq!(&b[4096..4100], b"pool");
        drop(b);
        punch(fd.as_fd(), 3 << 30, 1 << 20).unwrap();
        let c = map_range(fd.as_fd(), 3 << 30, 1 << 20).unwrap();
        assert_eq!(&c[4096..4100], &[0; 4]);
        assert!(
            map_range(fd.as_fd(), (1 << 40) - 4096, 8192).is_err(),
            "past the end"
        );
        assert!(map_range(fd.as_fd(), 100, 4096).is_err(), "unaligned");
    }

    /// What was written shows as data, the rest (and what was punched) as holes.
    #[test]
    fn data_ranges_are_what_was_written() {
        let fd = create(c"test-data", 1 << 20).unwrap();
        assert_eq!(data_ranges(fd.as_fd(), 0, 1 << 20).unwrap(), []);
        let mut m = map(fd.as_fd().try_clone_to_owned().unwrap(), 1 << 20).unwrap();
        m[8192] = 1;
        m[65536 + 100] = 2;
        let got = data_ranges(fd.as_fd(), 0, 1 << 20).unwrap();
        assert_eq!(got, [(8192, 12288), (65536, 69632)]);
        assert_eq!(
            data_ranges(fd.as_fd(), 65536, 65536 + 4096).unwrap(),
            [(65536, 69632)]
        );
        assert!(release_pages(&mut m, 8192, 4096));
        assert_eq!(
            data_ranges(fd.as_fd(), 0, 1 << 20).unwrap(),
            [(65536, 69632)]
        );
    }
}
