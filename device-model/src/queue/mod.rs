//! Submission and completion queues in guest memory (NVMe base 2.0 §3.3), and the per-SQ
//! table of in-flight command contexts (preallocated: no allocation per command).

use std::sync::Arc;

use nvme_spec::{Completion, Submission};
use zerocopy::IntoBytes;

use crate::dptr::IoVecs;
use crate::memory::{AccessError, MemoryMap};
use crate::ring_view::RingView;
use crate::shadow_doorbell::DoorbellSeen;

mod set;

pub use set::Queues;

/// A completion queue.
#[derive(Debug)]
pub struct CompletionQueue {
    pub id: u16,
    /// Guest address of entry 0.
    pub base: u64,
    /// Number of entries.
    pub size: u32,
    pub tail: u32,
    pub phase: bool,
    /// Head as last read from the doorbell (validated).
    pub head: u32,
    /// Interrupt vector and whether interrupts are enabled.
    pub vector: u16,
    pub irq_enabled: bool,
    /// Entries promised to commands already fetched (so a completion always finds room).
    pub reserved: u32,
    /// SQs that post here (a CQ with SQs cannot be deleted).
    pub sq_count: u16,
    /// Completions posted since the last interrupt, and when the first of them was.
    pub irq_pending: u32,
    pub irq_pending_since: Option<std::time::Instant>,
    /// Completions the previous interrupt covered (adaptive coalescing's memory).
    pub last_irq_batch: u32,
    /// The head doorbell as last seen (register and shadow copy).
    pub doorbell: DoorbellSeen,
    /// An I/O completion moved the tail since the journal recorded it. The record is written
    /// once per poll pass, before any fetch, so the completions a restore finds in the CQ
    /// past a recorded tail were posted after every fetch of a command with the same id.
    pub tail_unrecorded: bool,
    /// The ring through one host pointer, for the map it was found in.
    view: Option<RingView>,
}

impl CompletionQueue {
    /// A new, empty CQ.
    pub fn new(id: u16, base: u64, size: u32, vector: u16, irq_enabled: bool) -> Self {
        Self {
            id,
            base,
            size,
            tail: 0,
            phase: true,
            head: 0,
            vector,
            irq_enabled,
            reserved: 0,
            sq_count: 0,
            irq_pending: 0,
            irq_pending_since: None,
            view: None,
            last_irq_batch: 1,
            doorbell: DoorbellSeen::default(),
            tail_unrecorded: false,
        }
    }

    /// Entries posted and not yet consumed by the host.
    pub fn used(&self) -> u32 {
        ring_distance(self.head, self.tail, self.size)
    }

    /// Room for one more reservation (one slot always stays empty: full = tail + 1 == head).
    pub fn can_reserve(&self) -> bool {
        self.room() > 0
    }

    /// Reservations the CQ has room for now.
    pub fn room(&self) -> u32 {
        (self.size - 1).saturating_sub(self.used() + self.reserved)
    }

    /// Take the doorbell's head value if it is valid (between head and tail, inclusive).
    /// Returns false for an invalid value (§3.1.4.18: Invalid Doorbell Write Value).
    pub fn update_head(&mut self, db: u32) -> bool {
        if db >= self.size {
            return false;
        }
        let advance = ring_distance(self.head, db, self.size);
        if advance > self.used() {
            return false;
        }
        self.head = db;
        true
    }

    /// Find the ring's host view again when `mem` is a new map (once per poll).
    pub fn refresh_view(&mut self, mem: &Arc<MemoryMap>) {
        if !self.view.as_ref().is_some_and(|v| v.is_current(mem)) {
            self.view = RingView::new(mem, self.base, u64::from(self.size) * 16, true);
        }
    }

    /// Write `cqe` at the tail with the current phase; the status/phase half is written last
    /// so the host never sees a new phase with stale contents.
    #[allow(clippy::inline_always)] // one per command; `#[inline]` left it a call (callgrind)
    #[inline(always)]
    pub fn post(&mut self, mem: &MemoryMap, mut cqe: Completion) -> Result<(), AccessError> {
        let status = cqe.status.get() & !1 | u16::from(self.phase);
        cqe.status = status.into();
        let bytes: &[u8; 16] = cqe.as_bytes().try_into().unwrap_or(&[0; 16]);
        let posted = self
            .view
            .as_ref()
            .filter(|v| v.is_current(mem))
            .is_some_and(|v| v.write_cqe(self.tail, bytes));
        if !posted {
            self.post_through_map(mem, bytes)?;
        }
        self.advance_tail();
        self.irq_pending += 1;
        Ok(())
    }

    /// [`post`](Self::post) without a current view of the ring: through the DMA map.
    #[cold]
    #[inline(never)]
    fn post_through_map(&self, mem: &MemoryMap, bytes: &[u8; 16]) -> Result<(), AccessError> {
        let addr = self.base.wrapping_add(u64::from(self.tail) * 16); // unmapped if it wraps
        mem.write(addr, &bytes[..14])?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        mem.write(addr.wrapping_add(14), &bytes[14..])
    }

    /// Move the tail past one entry, flipping the phase at the end of the ring.
    #[inline]
    pub fn advance_tail(&mut self) {
        self.tail += 1;
        if self.tail == self.size {
            self.tail = 0;
            self.phase = !self.phase;
        }
    }
}

/// Entries from `from` to `to` going forward in a ring of `size` (both below `size`):
/// without the division a `%` costs on every command.
#[inline]
fn ring_distance(from: u32, to: u32, size: u32) -> u32 {
    if to >= from {
        to - from
    } else {
        to + size - from
    }
}

/// One in-flight command's context.
#[derive(Debug)]
pub struct Slot {
    pub cid: u16,
    pub opcode: u8,
    pub nsid: u32,
    /// Bytes moved (for SMART counters).
    pub bytes: u64,
    /// When the SQE was fetched, in [`sys_util::clock::ticks`] (latency statistics).
    pub fetched: u64,
    pub iov: IoVecs,
    /// Keeps the guest memory the iovecs point into mapped until completion.
    pub mem: Option<Arc<MemoryMap>>,
    /// A command made of several backend requests, or a Compare: its state
    /// ([`crate::compound`]; boxed: slots stay small, these commands are rare).
    pub compound: Option<Box<crate::compound::Compound>>,
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            cid: 0,
            opcode: 0,
            nsid: 0,
            bytes: 0,
            fetched: 0,
            iov: IoVecs::empty(), // storage is lent per command (Controller::iov_pool)
            mem: None,
            compound: None,
        }
    }
}

/// A submission queue.
#[derive(Debug)]
pub struct SubmissionQueue {
    pub id: u16,
    pub base: u64,
    pub size: u32,
    pub head: u32,
    /// Tail as last read from the doorbell (validated).
    pub tail: u32,
    pub cqid: u16,
    /// Command contexts, one per queue entry, and the stack of free ones.
    pub slots: Vec<Slot>,
    pub free: Vec<u16>,
    /// Admin command id of a pending Delete I/O SQ, completed once in-flight commands drain.
    pub deleting: Option<u16>,
    /// The tail doorbell as last seen (register and shadow copy).
    pub doorbell: DoorbellSeen,
    /// The ring through one host pointer, for the map it was found in.
    view: Option<RingView>,
}

impl SubmissionQueue {
    /// A new, empty SQ with `size` preallocated command slots.
    pub fn new(id: u16, base: u64, size: u32, cqid: u16) -> Self {
        let slots = (0..size).map(|_| Slot::default()).collect();
        let free = (0..size as u16).rev().collect();
        Self {
            id,
            base,
            size,
            head: 0,
            tail: 0,
            cqid,
            slots,
            free,
            deleting: None,
            doorbell: DoorbellSeen::default(),
            view: None,
        }
    }

    /// Commands fetched and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Take the doorbell's tail value if it is valid (< size). False for an invalid write.
    pub fn update_tail(&mut self, db: u32) -> bool {
        if db >= self.size {
            return false;
        }
        self.tail = db;
        true
    }

    /// True when there are entries between head and tail.
    pub fn has_work(&self) -> bool {
        self.head != self.tail
    }

    /// Find the ring's host view again when `mem` is a new map (once per poll).
    pub fn refresh_view(&mut self, mem: &Arc<MemoryMap>) {
        if !self.view.as_ref().is_some_and(|v| v.is_current(mem)) {
            self.view = RingView::new(mem, self.base, u64::from(self.size) * 64, false);
        }
    }

    /// Read the entry at head into `sqe` and advance head.
    #[inline]
    pub fn fetch(&mut self, mem: &MemoryMap, sqe: &mut Submission) -> Result<(), AccessError> {
        let raw = sqe.as_mut_bytes();
        let viewed = self
            .view
            .as_ref()
            .is_some_and(|v| v.is_current(mem) && v.read_sqe(self.head, raw));
        if !viewed {
            self.fetch_through_map(mem, raw)?;
        }
        self.head += 1;
        if self.head == self.size {
            self.head = 0;
        }
        Ok(())
    }

    /// [`fetch`](Self::fetch) without a current view of the ring: through the DMA map.
    #[cold]
    #[inline(never)]
    fn fetch_through_map(&self, mem: &MemoryMap, raw: &mut [u8]) -> Result<(), AccessError> {
        mem.read(self.base.wrapping_add(u64::from(self.head) * 64), raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cq_head_validation_and_room() {
        let mut cq = CompletionQueue::new(1, 0, 4, 1, true);
        assert!(cq.can_reserve());
        cq.tail = 2;
        assert!(!cq.update_head(3)); // past tail
        assert!(!cq.update_head(4)); // out of range
        assert!(cq.update_head(2));
        assert_eq!(cq.used(), 0);
        assert_eq!(cq.room(), 3, "one entry of four always stays empty");
        cq.reserved = 3;
        assert!(!cq.can_reserve());
        assert_eq!(cq.room(), 0);
        // posted entries the host has not consumed take room like reservations
        cq.reserved = 1;
        cq.tail = 0; // wrapped: 2 entries used (head 2, tail 0 of 4)
        assert_eq!(cq.used(), 2);
        assert_eq!(cq.room(), 0);
        cq.reserved = 0;
        assert_eq!(cq.room(), 1);
    }

    #[test]
    fn sq_tail_validation() {
        let mut sq = SubmissionQueue::new(1, 0, 8, 1);
        assert!(!sq.update_tail(8));
        assert!(sq.update_tail(7));
        assert!(sq.has_work());
        assert_eq!(sq.in_flight(), 0);
    }
}

#[cfg(test)]
mod memory_bound {
    /// What one SQ entry costs the daemon now that iovec storage is pooled (BENCHMARKS.md):
    /// the slot, with room for one iovec (a command of one segment borrows no block).
    #[test]
    fn per_entry_cost() {
        let slot = size_of::<super::Slot>();
        eprintln!("Slot {slot} B, free-list entry 2 B");
        assert!(slot <= 80, "a command slot grew to {slot} bytes");
    }
}
