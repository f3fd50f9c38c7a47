//! A queue's ring in guest memory seen through one host pointer: SQE fetches and CQE posts
//! without a region lookup and a generic copy per entry (the hot path's two guest-memory
//! accesses per command).
//!
//! A view is found once per map: it holds the [`MemoryMap`] snapshot it was found in, so
//! the memory stays mapped as long as the view lives (as any snapshot keeps its regions), and
//! it is used only while that snapshot is the one the reactor polls with
//! ([`RingView::is_current`]); after a DMA map change the queue finds it again. A ring that
//! is not inside one region, not 8-byte aligned or not accessible has no view: the queue
//! then goes through [`MemoryMap::read`] / [`MemoryMap::write`], which report the fault.

use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use crate::memory::MemoryMap;

/// SQ entry size and CQ entry size (NVMe base 2.0 §4.1 and §4.2, CC.IOSQES/IOCQES = 6/4).
const SQE: usize = 64;
const CQE: usize = 16;

/// A ring of `len` bytes reached through `host` (8-byte aligned: checked in [`RingView::new`],
/// so the word accesses below are aligned).
pub struct RingView {
    map: Arc<MemoryMap>,
    host: *mut u8,
    len: usize,
}

// SAFETY: `host` points into a mapping that `map` keeps alive wherever the view goes; all
// access through it is volatile (the guest writes the same memory concurrently).
unsafe impl Send for RingView {}

impl std::fmt::Debug for RingView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingView")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[allow(clippy::cast_ptr_alignment)] // `host` is 8-byte aligned, entries 16 or 64 bytes
impl RingView {
    /// The view of `[iova, iova + len)` in `map`, readable (SQ) or writable (CQ), when it
    /// lies in one region and is 8-byte aligned.
    pub fn new(map: &Arc<MemoryMap>, iova: u64, len: u64, write: bool) -> Option<Self> {
        let host = map.translate(iova, len, write).ok()?;
        if !(host as usize).is_multiple_of(8) {
            return None;
        }
        Some(Self {
            map: Arc::clone(map),
            host,
            len: usize::try_from(len).ok()?,
        })
    }

    /// True when the view was found in `map` (the snapshot being polled with).
    pub fn is_current(&self, map: &MemoryMap) -> bool {
        std::ptr::eq(Arc::as_ptr(&self.map), map)
    }

    /// Read submission queue entry `index` into `out` (64 bytes); false (and `out`
    /// untouched) past the ring or for another length.
    #[inline]
    pub fn read_sqe(&self, index: u32, out: &mut [u8]) -> bool {
        let Some(at) = (index as usize).checked_mul(SQE) else {
            return false;
        };
        if at.saturating_add(SQE) > self.len || out.len() != SQE {
            return false;
        }
        let src = self.host.wrapping_add(at).cast::<u64>();
        for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
            // SAFETY: `at + 64 <= len`, so the 8 aligned words lie in the ring, which lies in
            // a mapping `self.map` keeps alive; volatile, as the guest may write them.
            let w = unsafe { src.add(i).read_volatile() };
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        true
    }

    /// Read the little-endian dword at byte `off` (a multiple of 4); `None` past the view.
    #[inline]
    pub fn read_u32(&self, off: usize) -> Option<u32> {
        if !off.is_multiple_of(4) || off.saturating_add(4) > self.len {
            return None;
        }
        // SAFETY: `off + 4 <= len` and `off` is 4-aligned in an 8-aligned view: an aligned
        // dword inside a mapping `self.map` keeps alive; volatile, as the guest writes it.
        Some(u32::from_le(unsafe {
            self.host.wrapping_add(off).cast::<u32>().read_volatile()
        }))
    }

    /// Write the little-endian dword at byte `off` (a multiple of 4); false past the view.
    #[inline]
    pub fn write_u32(&self, off: usize, value: u32) -> bool {
        if !off.is_multiple_of(4) || off.saturating_add(4) > self.len {
            return false;
        }
        // SAFETY: as in `read_u32`; the view was made writable ([`RingView::new`]).
        unsafe {
            self.host
                .wrapping_add(off)
                .cast::<u32>()
                .write_volatile(value.to_le());
        }
        true
    }

    /// Write completion queue entry `index`: dwords 0-2 and the command identifier first,
    /// then (after a release fence) the status half-word with the phase tag, so the host
    /// never sees the new phase with stale contents. False past the ring.
    pub fn write_cqe(&self, index: u32, cqe: &[u8; CQE]) -> bool {
        let Some(at) = (index as usize).checked_mul(CQE) else {
            return false;
        };
        if at.saturating_add(CQE) > self.len {
            return false;
        }
        let dst = self.host.wrapping_add(at);
        let w0 = u64::from_ne_bytes(cqe[0..8].try_into().unwrap_or_default());
        let w1 = u32::from_ne_bytes(cqe[8..12].try_into().unwrap_or_default());
        let cid = u16::from_ne_bytes(cqe[12..14].try_into().unwrap_or_default());
        let status = u16::from_ne_bytes(cqe[14..16].try_into().unwrap_or_default());
        // SAFETY: `at + 16 <= len`: the entry lies in the ring, inside a mapping `self.map`
        // keeps alive; the ring is 8-byte aligned and entries are 16 bytes, so each store is
        // aligned; volatile, as the guest reads the same memory.
        unsafe {
            dst.cast::<u64>().write_volatile(w0);
            dst.add(8).cast::<u32>().write_volatile(w1);
            dst.add(12).cast::<u16>().write_volatile(cid);
            fence(Ordering::Release);
            dst.add(14).cast::<u16>().write_volatile(status);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestMemory, Protection};
    use std::os::fd::AsFd;

    const RW: Protection = Protection {
        read: true,
        write: true,
    };

    #[test]
    fn a_view_reads_and_writes_entries_in_its_ring_only_and_only_for_its_map() {
        let mem = GuestMemory::new();
        let fd = crate::memory::tests::memfd(0x4000);
        mem.map_fd(0x10000, 0x2000, fd.as_fd(), 0, RW).unwrap();
        mem.map_fd(0x12000, 0x2000, fd.as_fd(), 0x2000, RW).unwrap();
        let map = mem.snapshot();
        // a ring across two regions, an unaligned one, one past the map: no view
        assert!(RingView::new(&map, 0x11000, 0x2000, false).is_none());
        assert!(RingView::new(&map, 0x10004, 64, false).is_none());
        assert!(RingView::new(&map, 0x13000, 0x2000, false).is_none());
        let sq = RingView::new(&map, 0x10000, 4 * 64, false).unwrap();
        let mut sqe = [0u8; 64];
        sqe.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        map.write(0x10000 + 2 * 64, &sqe).unwrap();
        let mut got = [0u8; 64];
        assert!(sq.read_sqe(2, &mut got));
        assert_eq!(got, sqe);
        let mut untouched = [7u8; 64];
        assert!(!sq.read_sqe(4, &mut untouched), "past the ring");
        assert!(!sq.read_sqe(u32::MAX, &mut untouched));
        assert_eq!(untouched, [7u8; 64]);
        let cq = RingView::new(&map, 0x12000, 2 * 16, true).unwrap();
        let cqe: [u8; 16] = std::array::from_fn(|i| 0xa0 + i as u8);
        assert!(cq.write_cqe(1, &cqe));
        assert!(!cq.write_cqe(2, &cqe), "past the ring");
        let mut back = [0u8; 16];
        map.read(0x12000 + 16, &mut back).unwrap();
        assert_eq!(back, cqe);
        // the map changes: the view is not the current one any more
        assert!(cq.is_current(&map));
        mem.map_fd(0x20000, 0x1000, fd.as_fd(), 0, RW).unwrap();
        assert!(!cq.is_current(&mem.snapshot()));
        // a read-only region has a view for an SQ, none for a CQ
        let ro = Protection {
            read: true,
            write: false,
        };
        mem.map_fd(0x30000, 0x1000, fd.as_fd(), 0, ro).unwrap();
        let map = mem.snapshot();
        assert!(RingView::new(&map, 0x30000, 0x1000, false).is_some());
        assert!(RingView::new(&map, 0x30000, 0x1000, true).is_none());
    }

    #[test]
    fn dwords_are_read_and_written_inside_the_view_only() {
        let mem = GuestMemory::new();
        let fd = crate::memory::tests::memfd(0x2000);
        mem.map_fd(0x10000, 0x2000, fd.as_fd(), 0, RW).unwrap();
        let map = mem.snapshot();
        let page = RingView::new(&map, 0x10000, 0x1000, true).unwrap();
        map.write(0x10000 + 8, &0x1234_5678u32.to_le_bytes())
            .unwrap();
        assert_eq!(page.read_u32(8), Some(0x1234_5678));
        assert!(page.write_u32(0xffc, 0xdead_beef));
        let mut b = [0u8; 4];
        map.read(0x10000 + 0xffc, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        // past the view (the next page is mapped, but not part of it), unaligned, overflow
        assert_eq!(page.read_u32(0x1000), None);
        assert!(!page.write_u32(0x1000, 1));
        assert_eq!(page.read_u32(2), None);
        assert!(!page.write_u32(6, 1));
        assert_eq!(page.read_u32(usize::MAX - 3), None);
        map.read(0x11000, &mut b).unwrap();
        assert_eq!(b, [0; 4], "nothing written past the view");
    }
}
