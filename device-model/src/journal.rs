//! The state memfd of a controller served under a supervisor (`vnvme serve --supervised`):
//! what a new worker process needs to carry on where the last one stopped, planned or not.
//!
//! Two parts, written in the order that makes recovery exact:
//! - the **hot journal**, plain stores on the data path: per SQ the fetch position (head);
//!   per SQ slot a copy of each fetched-but-uncompleted SQE, released after its CQE is
//!   written; per CQ the tail and phase, recorded once per poll pass before any fetch (a
//!   restore finds the completions posted since in the CQ itself, by their phase tag); and
//!   per admin completion a "posting" record (the CQE with its CQ position and phase)
//!   written before the CQE goes to the guest, its CQ tail recorded right after;
//! - the **slow state**, a checksummed blob (registers, features, queue geometry, shadow
//!   doorbell addresses, an admin completion being posted) rewritten on the slow path:
//!   after register writes and before each admin completion is posted, double-buffered so a
//!   crash mid-write leaves the previous copy valid.
//!
//! The memfd is untrusted on the way in (a corrupt or foreign file): every length, count
//! and index read back is checked, and a blob whose checksum fails is ignored.

use std::sync::atomic::{Ordering, compiler_fence};

use sys_util::SharedMemory;

use crate::shadow_doorbell::DoorbellSeen;

/// Queue ids a journal has room for (the admin queue and up to 128 I/O queues).
pub const QUEUES: usize = 129;
/// Slots (queue entries) per SQ a journal has room for.
pub const SLOTS: usize = 1024;

const MAGIC: u64 = u64::from_le_bytes(*b"VNVMEJ01");
const BLOB_MAX: usize = 64 << 10;
const BLOB_OFF: usize = 4096;
const QUEUE_OFF: usize = BLOB_OFF + 2 * (BLOB_MAX + 4096);
const QUEUE_REC: usize = 32;
const SLOT_OFF: usize = (QUEUE_OFF + QUEUES * QUEUE_REC).next_multiple_of(4096);
const SLOT_REC: usize = 128;
/// Size of a state memfd of a build before the subsystem area (a supervisor of such a build
/// hands this size to a newer worker: it works without that area).
const BASE_SIZE: usize = SLOT_OFF + QUEUES * SLOTS * SLOT_REC;
/// The subsystem's namespaces (`save_subsystem`), after everything else.
const SUB_OFF: usize = BASE_SIZE.next_multiple_of(4096);
const SUB_BLOB_MAX: usize = 256 << 10;
/// Size of a state memfd.
pub const SIZE: u64 = (SUB_OFF + 2 * (SUB_BLOB_MAX + 4096)) as u64;

/// An SQ's head and fetch count share one word (one store moves both): head in the low
/// bits (queues have at most [`SLOTS`] entries), the count of fetches above.
const HEAD_BITS: u32 = 10;
const HEAD_MASK: u32 = (1 << HEAD_BITS) - 1;
const _: () = assert!(SLOTS <= 1 << HEAD_BITS);

/// Header: magic (8), active blob copy (4), active subsystem blob copy (4).
const H_ACTIVE: usize = 8;
const H_SUB_ACTIVE: usize = 12;

/// A double-buffered, checksummed blob: the word naming its active copy, where its two
/// copies start, and its largest size.
#[derive(Clone, Copy)]
struct Area {
    active: usize,
    off: usize,
    max: usize,
}

/// The controller's slow state.
const CONTROLLER: Area = Area {
    active: H_ACTIVE,
    off: BLOB_OFF,
    max: BLOB_MAX,
};
/// The namespaces of the subsystem this controller keeps (its PF, or its one vfio-user
/// controller): what Namespace Management and Attachment changed.
const SUBSYSTEM: Area = Area {
    active: H_SUB_ACTIVE,
    off: SUB_OFF,
    max: SUB_BLOB_MAX,
};

impl Area {
    fn base(self, copy: u32) -> usize {
        self.off + (copy as usize & 1) * (self.max + 4096)
    }
}

#[cfg(test)]
thread_local! {
    /// Kill-point tests: the journal step (1-based) at which the worker "dies" (panics);
    /// 0: never.
    pub(crate) static CRASH_AT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A point where a worker may die between two journal stores (tests make it die there).
#[inline]
#[track_caller]
fn step() {
    #[cfg(test)]
    let at = std::panic::Location::caller();
    #[cfg(test)]
    CRASH_AT.with(|c| match c.get() {
        0 => {}
        1 => {
            c.set(0);
            panic!("kill point at {at}");
        }
        n => c.set(n - 1),
    });
}

/// A slot record's state.
pub const FREE: u32 = 0;
pub const FETCHED: u32 = 1;
pub const POSTING: u32 = 2;

/// A slot record as read back.
#[derive(Clone, Copy, Debug)]
pub struct SlotRecord {
    pub state: u32,
    /// SQ position the command was fetched from.
    pub sq_pos: u32,
    /// Its number among the SQ's fetches (modulo 2^22): tells the one fetch whose head
    /// store may be missing from commands fetched a lap of the ring earlier, still in flight.
    pub seq: u32,
    /// CQ position and phase of a completion being posted.
    pub cq_pos: u32,
    pub phase: bool,
    /// The CQE being posted (phase bit included).
    pub cqe: [u8; 16],
    /// The command.
    pub sqe: [u8; 64],
}

/// Why a state memfd cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("state memfd: {0}")]
    Map(#[source] std::io::Error),
    #[error("state memfd of {0} bytes, {SIZE} expected")]
    Size(usize),
    #[error("state blob of {0} bytes does not fit")]
    TooLarge(usize),
}

/// A controller's state memfd, mapped.
#[derive(Debug)]
pub struct Journal {
    mem: SharedMemory,
}

impl Journal {
    /// A new, empty state memfd (the supervisor's; the worker maps it with [`Journal::open`]).
    pub fn create() -> std::io::Result<SharedMemory> {
        let m = SharedMemory::new(c"vnvme-state", SIZE)?;
        m.write(0, &MAGIC.to_le_bytes());
        Ok(m)
    }

    /// Map a state memfd passed by the supervisor.
    pub fn open(fd: std::os::fd::OwnedFd) -> Result<Self, JournalError> {
        let mem = SharedMemory::from_fd(fd, SIZE).map_err(JournalError::Map)?;
        if mem.len() as u64 != SIZE && mem.len() != BASE_SIZE {
            return Err(JournalError::Size(mem.len()));
        }
        Ok(Self { mem })
    }

    fn u32_at(&self, off: usize) -> u32 {
        self.mem.atomic_u32(off).load(Ordering::Acquire)
    }

    /// One 32-bit store, in program order with the stores before it (Release: a plain
    /// `mov` on x86).
    #[inline]
    fn put_u32(&self, off: usize, v: u32) {
        self.mem.atomic_u32(off).store(v, Ordering::Release);
    }

    fn slot_off(qid: u16, slot: u16) -> Option<usize> {
        ((qid as usize) < QUEUES && (slot as usize) < SLOTS)
            .then(|| SLOT_OFF + ((qid as usize) * SLOTS + slot as usize) * SLOT_REC)
    }

    fn queue_off(qid: u16) -> Option<usize> {
        ((qid as usize) < QUEUES).then(|| QUEUE_OFF + qid as usize * QUEUE_REC)
    }

    // ---- hot journal: plain stores, ordered by compiler fences (x86 keeps store order;
    // a worker killed mid-way leaves every store it executed in the shared page cache) ----

    /// SQE `sqe` was fetched into `slot` of SQ `qid` from position `sq_pos`; the SQ's head
    /// is now `head`. The record (with the fetch's number) is complete before the head and
    /// the fetch count move, together, in one store.
    #[inline]
    pub fn fetched(&self, qid: u16, slot: u16, sq_pos: u32, head: u32, sqe: &[u8; 64]) {
        let (Some(off), Some(q)) = (Self::slot_off(qid, slot), Self::queue_off(qid)) else {
            return;
        };
        let rec = self.mem.window::<SLOT_REC>(off);
        let queue = self.mem.window::<QUEUE_REC>(q);
        let seq = (queue.load_u32(0) >> HEAD_BITS).wrapping_add(1) & (u32::MAX >> HEAD_BITS);
        step();
        rec.write_array(32, sqe);
        rec.store_u32(4, sq_pos);
        rec.store_u32(96, seq);
        rec.store_u32(0, FETCHED);
        step();
        queue.store_u32(0, seq << HEAD_BITS | (head & HEAD_MASK));
        step();
    }

    /// The completion `cqe` (phase bit set) of `slot` of SQ `qid` is about to be written
    /// at `cq_pos` of its CQ with `phase`.
    #[inline]
    pub fn posting(&self, qid: u16, slot: u16, cq_pos: u32, phase: bool, cqe: &[u8; 16]) {
        let Some(off) = Self::slot_off(qid, slot) else {
            return;
        };
        let rec = self.mem.window::<SLOT_REC>(off);
        step();
        rec.write_array(16, cqe);
        rec.store_u32(8, cq_pos);
        rec.store_u32(12, u32::from(phase));
        rec.store_u32(0, POSTING);
        step();
    }

    /// CQ `cqid` has tail `tail` and phase `phase` now (a CQE was written).
    #[inline]
    pub fn cq_moved(&self, cqid: u16, tail: u32, phase: bool) {
        if let Some(q) = Self::queue_off(cqid) {
            step();
            compiler_fence(Ordering::Release);
            self.mem
                .window::<QUEUE_REC>(q)
                .store_u32(4, tail | u32::from(phase) << 31);
            step();
        }
    }

    /// `slot` of SQ `qid` holds no command any more.
    #[inline]
    pub fn freed(&self, qid: u16, slot: u16) {
        if let Some(off) = Self::slot_off(qid, slot) {
            self.mem.window::<SLOT_REC>(off).store_u32(0, FREE);
            step();
        }
    }

    /// The SQ tail (`cq` false) or CQ head doorbell of queue `qid` as the controller saw it
    /// last changed: register copy, shadow copy, value in use. The next worker starts from it
    /// so that it tells a newer write of either copy from an old one.
    #[inline]
    pub fn doorbell_seen(&self, qid: u16, cq: bool, seen: &DoorbellSeen) {
        if let Some(q) = Self::queue_off(qid) {
            let rec = self.mem.window::<QUEUE_REC>(q);
            let at = if cq { 20 } else { 8 };
            // the value first: a record cut short then holds an older copy beside the new
            // value, which the next worker takes for a change (and reads again); the other
            // way round it would take the new copy for the old one and miss the change
            step();
            rec.store_u32(at + 8, seen.value);
            step();
            rec.store_u32(at, seen.register);
            step();
            rec.store_u32(at + 4, seen.shadow);
            step();
        }
    }

    /// What [`doorbell_seen`](Self::doorbell_seen) recorded.
    pub fn doorbell(&self, qid: u16, cq: bool) -> DoorbellSeen {
        Self::queue_off(qid).map_or_else(DoorbellSeen::default, |q| {
            let at = q + if cq { 20 } else { 8 };
            DoorbellSeen {
                register: self.u32_at(at),
                shadow: self.u32_at(at + 4),
                value: self.u32_at(at + 8),
            }
        })
    }

    /// A queue pair id starts afresh (created): head 0, tail 0 with phase 1, `slots` free.
    pub fn init_queue(&self, qid: u16, slots: u32) {
        let Some(q) = Self::queue_off(qid) else {
            return;
        };
        self.put_u32(q, 0);
        self.put_u32(q + 4, 1 << 31);
        for s in 0..(slots as usize).min(SLOTS) {
            if let Some(off) = Self::slot_off(qid, s as u16) {
                self.put_u32(off, FREE);
            }
        }
    }

    /// Clear the SQ half of a queue id (head 0, slots free) without touching its CQ record.
    pub fn init_sq(&self, qid: u16, slots: u32) {
        let Some(q) = Self::queue_off(qid) else {
            return;
        };
        self.put_u32(q, 0);
        self.doorbell_seen(qid, false, &DoorbellSeen::default());
        for s in 0..(slots as usize).min(SLOTS) {
            if let Some(off) = Self::slot_off(qid, s as u16) {
                self.put_u32(off, FREE);
            }
        }
    }

    /// Clear the CQ half of a queue id (tail 0, phase 1).
    pub fn init_cq(&self, qid: u16) {
        if let Some(q) = Self::queue_off(qid) {
            self.put_u32(q + 4, 1 << 31);
            self.doorbell_seen(qid, true, &DoorbellSeen::default());
        }
    }

    /// Record SQ `qid`'s head and fetch count as a restore found them.
    pub fn set_sq_head(&self, qid: u16, head: u32, count: u32) {
        if let Some(q) = Self::queue_off(qid) {
            self.put_u32(q, count << HEAD_BITS | (head & HEAD_MASK));
        }
    }

    /// SQ `qid`'s recorded head and fetch count.
    pub fn sq_head(&self, qid: u16) -> (u32, u32) {
        let v = Self::queue_off(qid).map_or(0, |q| self.u32_at(q));
        (v & HEAD_MASK, v >> HEAD_BITS)
    }

    /// The number the next fetch of an SQ whose fetch count is `count` gets.
    pub fn next_seq(count: u32) -> u32 {
        count.wrapping_add(1) & (u32::MAX >> HEAD_BITS)
    }

    /// CQ `qid`'s recorded tail and phase.
    pub fn cq_tail(&self, qid: u16) -> (u32, bool) {
        let v = Self::queue_off(qid).map_or(1 << 31, |q| self.u32_at(q + 4));
        (v & !(1 << 31), v >> 31 != 0)
    }

    /// The record of `slot` of SQ `qid`.
    pub fn slot(&self, qid: u16, slot: u16) -> Option<SlotRecord> {
        let off = Self::slot_off(qid, slot)?;
        let mut r = SlotRecord {
            state: self.u32_at(off),
            sq_pos: self.u32_at(off + 4),
            seq: self.u32_at(off + 96),
            cq_pos: self.u32_at(off + 8),
            phase: self.u32_at(off + 12) & 1 != 0,
            cqe: [0; 16],
            sqe: [0; 64],
        };
        self.mem.read(off + 16, &mut r.cqe);
        self.mem.read(off + 32, &mut r.sqe);
        Some(r)
    }

    // ---- slow state: a double-buffered, checksummed blob ----

    /// Store `blob` as the current slow state: written to the inactive copy, then made
    /// active with one store.
    pub fn save_blob(&self, blob: &[u8]) -> Result<(), JournalError> {
        self.save_in(CONTROLLER, blob)
    }

    /// The current slow state, if a valid one was saved (`None`: a fresh or corrupt file).
    pub fn load_blob(&self) -> Option<Vec<u8>> {
        self.load_from(CONTROLLER)
    }

    /// Store `blob` as the namespaces of the subsystem this controller keeps, as
    /// [`save_blob`](Self::save_blob) does (a memfd of an earlier build has no room: an
    /// error).
    pub fn save_subsystem(&self, blob: &[u8]) -> Result<(), JournalError> {
        if self.mem.len() < SIZE as usize {
            return Err(JournalError::Size(self.mem.len()));
        }
        self.save_in(SUBSYSTEM, blob)
    }

    /// The subsystem's namespaces as last saved, if a valid copy was.
    pub fn load_subsystem(&self) -> Option<Vec<u8>> {
        if self.mem.len() < SIZE as usize {
            return None;
        }
        self.load_from(SUBSYSTEM)
    }

    fn save_in(&self, area: Area, blob: &[u8]) -> Result<(), JournalError> {
        if blob.len() > area.max {
            return Err(JournalError::TooLarge(blob.len()));
        }
        step();
        let next = self.u32_at(area.active) ^ 1;
        let base = area.base(next);
        self.mem.write(base + 16, blob);
        self.put_u32(base, blob.len() as u32);
        self.mem.write(base + 8, &checksum(blob).to_le_bytes());
        compiler_fence(Ordering::Release);
        std::sync::atomic::fence(Ordering::Release);
        self.put_u32(area.active, next & 1);
        step();
        Ok(())
    }

    fn load_from(&self, area: Area) -> Option<Vec<u8>> {
        let mut magic = [0u8; 8];
        self.mem.read(0, &mut magic);
        if u64::from_le_bytes(magic) != MAGIC {
            return None;
        }
        let base = area.base(self.u32_at(area.active));
        let len = self.u32_at(base) as usize;
        if len == 0 || len > area.max {
            return None;
        }
        let mut sum = [0u8; 8];
        self.mem.read(base + 8, &mut sum);
        let mut blob = vec![0u8; len];
        self.mem.read(base + 16, &mut blob);
        (checksum(&blob) == u64::from_le_bytes(sum)).then_some(blob)
    }

    /// Forget the slow state (the client went away: the next one starts from reset).
    pub fn clear(&self) {
        for copy in 0..2 {
            self.put_u32(CONTROLLER.base(copy), 0);
        }
    }
}

/// FNV-1a, 64 bit: detects a torn or foreign blob (not an adversary: the file is ours).
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal() -> Journal {
        let m = Journal::create().unwrap();
        Journal::open(m.fd().try_clone_to_owned().unwrap()).unwrap()
    }

    #[test]
    fn blob_round_trip_and_corruption() {
        let j = journal();
        assert!(j.load_blob().is_none());
        j.save_blob(b"first").unwrap();
        j.save_blob(b"second").unwrap();
        assert_eq!(j.load_blob().unwrap(), b"second");
        // corrupt the active copy: it is refused, never trusted
        let base = CONTROLLER.base(j.u32_at(H_ACTIVE));
        j.mem.write(base + 16, b"X");
        assert!(j.load_blob().is_none());
        j.put_u32(base, u32::MAX);
        assert!(j.load_blob().is_none());
        assert!(j.save_blob(&vec![0; BLOB_MAX + 1]).is_err());
    }

    /// The subsystem's blob is a copy of its own: neither overwrites the other. A memfd of an
    /// earlier build (no room for it) still opens, without it.
    #[test]
    fn the_subsystem_blob_stands_beside_the_controller_blob() {
        let j = journal();
        assert!(j.load_subsystem().is_none());
        j.save_blob(b"controller").unwrap();
        j.save_subsystem(b"subsystem").unwrap();
        j.save_subsystem(b"subsystem 2").unwrap();
        assert_eq!(j.load_blob().unwrap(), b"controller");
        assert_eq!(j.load_subsystem().unwrap(), b"subsystem 2");
        j.clear();
        assert_eq!(
            j.load_subsystem().unwrap(),
            b"subsystem 2",
            "a client's reset"
        );
        assert!(j.save_subsystem(&vec![0; SUB_BLOB_MAX + 1]).is_err());
        let old = SharedMemory::new(c"old", BASE_SIZE as u64).unwrap();
        old.write(0, &MAGIC.to_le_bytes());
        let o = Journal::open(old.fd().try_clone_to_owned().unwrap()).unwrap();
        o.save_blob(b"x").unwrap();
        assert!(o.save_subsystem(b"y").is_err());
        assert!(o.load_subsystem().is_none());
    }

    #[test]
    fn slot_records_in_order() {
        let j = journal();
        j.init_queue(1, 8);
        j.fetched(1, 3, 5, 6, &[7u8; 64]);
        assert_eq!(j.sq_head(1), (6, 1));
        j.fetched(1, 4, 6, 7, &[8u8; 64]);
        assert_eq!(j.sq_head(1), (7, 2));
        assert_eq!(j.slot(1, 4).unwrap().seq, 2);
        assert_eq!(Journal::next_seq(2), 3);
        assert_eq!(Journal::next_seq(u32::MAX >> 10), 0);
        let r = j.slot(1, 3).unwrap();
        assert_eq!((r.state, r.sq_pos, r.sqe[0]), (FETCHED, 5, 7));
        j.posting(1, 3, 2, true, &[9u8; 16]);
        let r = j.slot(1, 3).unwrap();
        assert_eq!(
            (r.state, r.cq_pos, r.phase, r.cqe[0]),
            (POSTING, 2, true, 9)
        );
        j.cq_moved(1, 3, true);
        assert_eq!(j.cq_tail(1), (3, true));
        j.freed(1, 3);
        assert_eq!(j.slot(1, 3).unwrap().state, FREE);
        assert!(j.slot(200, 0).is_none());
        assert!(j.slot(1, SLOTS as u16).is_none());
    }
}
