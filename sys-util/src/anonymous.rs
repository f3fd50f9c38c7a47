//! Private anonymous memory: RAM namespaces and the process-wide zero chunk.

use std::sync::OnceLock;

use memmap2::{Mmap, MmapMut, MmapOptions};

/// Bytes of [`zeroes`].
pub const ZERO_CHUNK: usize = 1 << 20;

/// `len` bytes of zeroed private memory, populated lazily and without swap reservation
/// (`MAP_NORESERVE`): a RAM namespace uses only what was written.
pub fn lazy_zeroed(len: usize) -> std::io::Result<MmapMut> {
    MmapOptions::new().len(len).no_reserve_swap().map_anon()
}

/// Give the whole pages of `[offset, offset + len)` of a private anonymous mapping back to
/// the kernel (`MADV_DONTNEED`): they read as zeroes and use no memory until written again.
/// The range must be page aligned; false when the kernel refused (nothing changed then).
pub fn release_pages(map: &mut MmapMut, offset: usize, len: usize) -> bool {
    use memmap2::UncheckedAdvice;
    // SAFETY: `map` is borrowed exclusively, so no reference into it is alive while its
    // pages are replaced by zero pages, which is all MADV_DONTNEED does to a private
    // anonymous mapping; memmap2 checks the range against the mapping.
    unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, offset, len) }.is_ok()
}

/// The kernel's page size (4 KiB on x86-64; 16 or 64 KiB on some arm64 and ppc64 kernels):
/// the unit [`release_pages`] and `kept_ram::release_pages` give back.
pub fn page_size() -> usize {
    static SIZE: OnceLock<usize> = OnceLock::new();
    *SIZE.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the running system; no memory is passed.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(n)
            .ok()
            .filter(|n| n.is_power_of_two())
            .unwrap_or(4096)
    })
}

/// [`ZERO_CHUNK`] zero bytes for the whole process, never written: the source of backends
/// that write zeroes. A read-only anonymous mapping (every page is the kernel's zero page,
/// so no memory is used), or, should that fail, a leaked heap buffer.
pub fn zeroes() -> &'static [u8] {
    static ZEROES: OnceLock<Option<Mmap>> = OnceLock::new();
    static FALLBACK: OnceLock<Box<[u8]>> = OnceLock::new();
    let mapped = ZEROES.get_or_init(|| {
        MmapOptions::new()
            .len(ZERO_CHUNK)
            .map_anon()
            .and_then(MmapMut::make_read_only)
            .ok()
    });
    match mapped {
        Some(m) => m,
        None => FALLBACK.get_or_init(|| vec![0u8; ZERO_CHUNK].into_boxed_slice()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_chunk_is_zero_and_lazy_memory_is_writable() {
        assert_eq!(zeroes().len(), ZERO_CHUNK);
        assert!(page_size() >= 4096 && page_size().is_power_of_two());
        assert!(zeroes().iter().all(|&b| b == 0));
        let mut m = lazy_zeroed(1 << 30).unwrap();
        m[12345] = 7;
        m[8192] = 9;
        assert_eq!(m[12345], 7);
        assert_eq!(m[0], 0);
        assert!(release_pages(&mut m, 4096, 8192));
        assert_eq!(m[8192], 0, "released pages read as zeroes");
        assert_eq!(m[12345], 7, "the page after the range is kept");
    }
}
