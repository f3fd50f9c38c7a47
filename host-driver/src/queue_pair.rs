//! A submission/completion queue pair in the driver's DMA memory (NVMe base 2.0 §3.3): the
//! admin queue and every I/O queue. Command ids index a preallocated table (no allocation
//! per command), each with its own PRP list page; completions are polled by phase tag.
//!
//! A command id is the slot's index in its low bits and a generation, bumped each time the
//! slot is used, in the bits above (as Linux does): a completion posted twice, or for an
//! earlier use of the slot, does not match the slot's current command id and is counted as
//! stale ([`QueuePair::stale_completions`]) instead of completing the wrong command.

use std::sync::Arc;

use nvme_spec::opcode::nvm;
use nvme_spec::{Status, Submission};

use crate::dma::{DmaBuffer, DmaMemory, PAGE};
use crate::error::DriverError;

/// The shadow doorbell and EventIdx pages of Doorbell Buffer Config (NVMe base 2.0 §5.8),
/// shared by the driver and its I/O queue pairs.
#[derive(Debug)]
pub(crate) struct ShadowPages {
    pub shadow: DmaBuffer,
    pub event_idx: DmaBuffer,
}

/// One doorbell kept in the shadow page (entry `off`, in bytes), as Linux keeps the I/O
/// queues' doorbells: the host writes the shadow copy and writes the register only when the
/// controller's EventIdx says it waits for one.
#[derive(Debug)]
struct ShadowDoorbell {
    pages: Arc<ShadowPages>,
    off: usize,
}

impl ShadowDoorbell {
    /// Store `new` in the shadow copy; true when the register must be written too (the
    /// EventIdx test of virtio and Linux: `new - event_idx - 1 < new - old`, 16 bits).
    #[inline]
    #[allow(clippy::cast_ptr_alignment)] // page-aligned buffers, 4-byte aligned entries
    fn update(&self, new: u16) -> bool {
        let entry = |page: &DmaBuffer| page.as_ptr().wrapping_add(self.off).cast::<u32>();
        let (db, ei) = (entry(&self.pages.shadow), entry(&self.pages.event_idx));
        // SAFETY: `off` is the entry of a queue the driver created, inside both pages (the
        // driver sized them for every queue it may create); 4-byte aligned; the pages live as
        // long as `self.pages`. Volatile: the controller reads the one and writes the other.
        let (old, event_idx) = unsafe {
            let old = db.read_volatile() as u16;
            db.write_volatile(u32::from(new));
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            (old, ei.read_volatile() as u16)
        };
        new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
    }
}

/// A finished command: the caller's tag, status and dword 0, and the slot it held (see
/// [`QueuePair::slot_of`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub user: u64,
    pub status: Status,
    pub dw0: u32,
    pub slot: u16,
}

struct Slot {
    user: u64,
    busy: bool,
    /// The command id of the slot's current (or last) use: generation and index.
    cid: u16,
    /// The queue's clock when the command was submitted (see [`QueuePair::tick`]).
    submitted_at: u32,
    prp_list: DmaBuffer,
}

/// One queue pair. I/O queue pairs are `Send`: move one to the thread that polls it.
pub struct QueuePair {
    qid: u16,
    size: u16,
    sq: DmaBuffer,
    cq: DmaBuffer,
    sq_tail: u16,
    /// SQ tail last written to the doorbell.
    sq_rung: u16,
    cq_head: u16,
    phase: bool,
    sq_db: *mut u32,
    cq_db: *mut u32,
    /// The SQ tail and CQ head in the shadow page, once Doorbell Buffer Config is on.
    shadow: Option<(ShadowDoorbell, ShadowDoorbell)>,
    slots: Vec<Slot>,
    /// Indices of free slots.
    free: Vec<u16>,
    /// Bits of a command id that hold the slot index (the generation is above them).
    index_bits: u32,
    /// Completions whose command id matched no command in flight.
    stale: u64,
    /// A coarse clock the owner advances (no clock read per command).
    clock: u32,
}

/// An I/O queue pair (the same type as the admin queue pair).
pub type IoQueuePair = QueuePair;

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("qid", &self.qid)
            .field("size", &self.size)
            .field("outstanding", &self.outstanding())
            .finish()
    }
}

// SAFETY: the doorbell pointers refer to the transport's shared mapping, which outlives the
// queue pair (the controller keeps it); each doorbell is written by this queue pair only.
unsafe impl Send for QueuePair {}

impl QueuePair {
    /// Rings for queue `qid` with `size` entries (2..=65536) and its doorbells in `doorbells`
    /// (CAP.DSTRD stride `stride` bytes).
    pub(crate) fn new(
        dma: &Arc<DmaMemory>,
        qid: u16,
        size: u16,
        doorbells: *mut u32,
        stride: usize,
    ) -> Result<Self, DriverError> {
        if size < 2 {
            return Err(DriverError::Invalid(format!("queue size {size} < 2")));
        }
        let sq = dma.alloc(u64::from(size) * 64)?;
        let cq = dma.alloc(u64::from(size) * 16)?;
        // one less command than entries: a full SQ never overruns its head
        let n = size - 1;
        let mut slots = Vec::with_capacity(n as usize);
        for _ in 0..n {
            slots.push(Slot {
                user: 0,
                busy: false,
                cid: slots.len() as u16,
                submitted_at: 0,
                prp_list: dma.alloc(PAGE)?,
            });
        }
        let words = stride / 4;
        // SAFETY: doorbell registers of queue qid lie inside the mapped doorbell page (the
        // controller checked qid against the queues it may create).
        let (sq_db, cq_db) = unsafe {
            (
                doorbells.add(2 * qid as usize * words),
                doorbells.add((2 * qid as usize + 1) * words),
            )
        };
        Ok(Self {
            qid,
            size,
            sq,
            cq,
            sq_tail: 0,
            sq_rung: 0,
            cq_head: 0,
            phase: true,
            sq_db,
            cq_db,
            shadow: None,
            slots,
            free: (0..n).rev().collect(),
            index_bits: u16::BITS - (n - 1).leading_zeros(),
            stale: 0,
            clock: 0,
        })
    }

    /// Keep this queue's doorbells in `pages` from now on (before its first command): entries
    /// `2 qid` and `2 qid + 1`, `stride` bytes apart.
    pub(crate) fn use_shadow(&mut self, pages: &Arc<ShadowPages>, stride: usize) {
        let at = |i: usize| ShadowDoorbell {
            pages: Arc::clone(pages),
            off: i * stride,
        };
        let q = usize::from(self.qid);
        self.shadow = Some((at(2 * q), at(2 * q + 1)));
    }

    /// Queue id.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Device address of the SQ and CQ rings.
    pub(crate) fn rings(&self) -> (u64, u64) {
        (self.sq.iova(), self.cq.iova())
    }

    /// Commands submitted and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Completions received for no command in flight: posted twice, or for an earlier use
    /// of a command id (a device error; each is also logged).
    pub fn stale_completions(&self) -> u64 {
        self.stale
    }

    /// The next command id of slot `index` (its generation bumped; the index alone when the
    /// index takes all 16 bits).
    #[inline]
    fn next_cid(&self, index: u16) -> u16 {
        let generation = u32::from(self.slots[index as usize].cid) >> self.index_bits;
        ((generation + 1) << self.index_bits | u32::from(index)) as u16
    }

    /// The slot of the command submitted with id `cid` (below the queue's size less one):
    /// a caller may keep what a command needs beside its tag in a table of its own, indexed
    /// by slot, and find it again by [`Request::slot`].
    #[inline]
    pub fn slot_of(&self, cid: u16) -> u16 {
        self.index_of(cid) as u16
    }

    /// The slot index in command id `cid`.
    #[inline]
    fn index_of(&self, cid: u16) -> usize {
        usize::from(cid) & ((1 << self.index_bits) - 1)
    }

    /// Room for another command.
    pub fn can_submit(&self) -> bool {
        !self.free.is_empty()
    }

    /// Put `sqe` on the queue (its CID is assigned here) without ringing the doorbell; `user`
    /// comes back with the completion. Call [`Self::ring`] after a batch.
    #[allow(clippy::inline_always)] // once per command on a forwarding hop (callgrind)
    #[inline(always)]
    pub fn submit(&mut self, mut sqe: Submission, user: u64) -> Result<u16, DriverError> {
        let index = self
            .free
            .pop()
            .ok_or_else(|| DriverError::Invalid(format!("queue {} full", self.qid)))?;
        let cid = self.next_cid(index);
        let slot = &mut self.slots[index as usize];
        slot.user = user;
        slot.busy = true;
        slot.cid = cid;
        slot.submitted_at = self.clock;
        sqe.cid = cid.into();
        let off = self.sq_tail as usize * 64;
        let bytes: &[u8; 64] = zerocopy::transmute_ref!(&sqe);
        self.sq.write_array(off, bytes);
        self.sq_tail += 1;
        if self.sq_tail == self.size {
            self.sq_tail = 0;
        }
        Ok(cid)
    }

    /// Write the SQ tail doorbell if commands were added since the last ring.
    #[allow(clippy::inline_always)] // once per command on a forwarding hop (callgrind)
    #[inline(always)]
    pub fn ring(&mut self) {
        if self.sq_rung != self.sq_tail {
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            if self
                .shadow
                .as_ref()
                .is_none_or(|s| s.0.update(self.sq_tail))
            {
                // SAFETY: sq_db points at this queue's doorbell in the live mapping.
                unsafe { std::ptr::write_volatile(self.sq_db, u32::from(self.sq_tail)) };
            }
            self.sq_rung = self.sq_tail;
        }
    }

    /// Submit a command with a data buffer of `len` bytes at `iova` (physically contiguous,
    /// page aligned), building PRP1/PRP2 and a PRP list when needed.
    pub fn submit_with_data(
        &mut self,
        mut sqe: Submission,
        iova: u64,
        len: u64,
        user: u64,
    ) -> Result<u16, DriverError> {
        let pages = len.div_ceil(PAGE);
        if pages > PAGE / 8 + 1 {
            return Err(DriverError::Invalid(format!(
                "{len} bytes need more than one PRP list page"
            )));
        }
        sqe.prp1 = iova.into();
        sqe.prp2 = 0.into();
        let Some(&index) = self.free.last() else {
            return Err(DriverError::Invalid(format!("queue {} full", self.qid)));
        };
        if pages == 2 {
            sqe.prp2 = (iova + PAGE).into();
        } else if pages > 2 {
            let list = &mut self.slots[index as usize].prp_list;
            let entries = list.as_mut_slice();
            for i in 1..pages {
                let at = (i as usize - 1) * 8;
                entries[at..at + 8].copy_from_slice(&(iova + i * PAGE).to_le_bytes());
            }
            sqe.prp2 = list.iova().into();
        }
        self.submit(sqe, user)
    }

    /// Advance the queue's coarse clock by one tick; the owner calls this at a fixed
    /// period (say every 100 ms) to time commands out without reading a clock per command.
    pub fn tick(&mut self) {
        self.clock = self.clock.wrapping_add(1);
    }

    /// Commands outstanding for at least `ticks` ticks: (command id, user tag).
    pub fn overdue(&self, ticks: u32) -> Vec<(u16, u64)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.busy && self.clock.wrapping_sub(s.submitted_at) >= ticks)
            .map(|(_, s)| (s.cid, s.user))
            .collect()
    }

    /// Complete every outstanding command locally with `status` (after a controller reset
    /// the device will never complete them).
    pub fn fail_outstanding(&mut self, status: Status, mut done: impl FnMut(Request)) -> usize {
        let mut n = 0;
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if slot.busy {
                slot.busy = false;
                self.free.push(index as u16);
                n += 1;
                done(Request {
                    user: slot.user,
                    status,
                    dw0: 0,
                    slot: index as u16,
                });
            }
        }
        n
    }

    /// Submit a command whose data is the device-address segments `segs` (in order), with
    /// PRPs: only the first segment may start inside a page and only the last may end inside
    /// one (NVMe base 2.0 §4.1.1); anything else is refused so the caller can bounce it.
    #[inline]
    pub fn submit_segments(
        &mut self,
        mut sqe: Submission,
        segs: &[(u64, u64)],
        user: u64,
    ) -> Result<u16, DriverError> {
        let refuse = |why: &str| Err(DriverError::Invalid(format!("not PRP-compatible: {why}")));
        let Some(&index) = self.free.last() else {
            return Err(DriverError::Invalid(format!("queue {} full", self.qid)));
        };
        let n = segs.len();
        if n == 0 || segs.iter().any(|&(_, l)| l == 0) {
            return refuse("empty segment");
        }
        if let [one] = *segs
            && Self::fits_two_pages(one)
        {
            set_two_page_prps(&mut sqe, one);
            return self.submit(sqe, user);
        }
        let mut pages = 0usize;
        let list = self.slots[index as usize].prp_list.as_mut_slice();
        let mut first = 0u64;
        for (i, &(addr, len)) in segs.iter().enumerate() {
            if addr & 3 != 0
                || (i > 0 && addr % PAGE != 0)
                || (i + 1 < n && (addr + len) % PAGE != 0)
            {
                return refuse("segment boundary inside a page");
            }
            // page starts covered by this segment
            let mut page = addr & !(PAGE - 1);
            let end = addr + len;
            while page < end {
                let entry = if pages == 0 { addr } else { page };
                if pages == 0 {
                    first = entry;
                } else {
                    let at = (pages - 1) * 8;
                    if at + 8 > list.len() {
                        return refuse("more pages than one PRP list holds");
                    }
                    list[at..at + 8].copy_from_slice(&entry.to_le_bytes());
                }
                pages += 1;
                page += PAGE;
            }
        }
        sqe.prp1 = first.into();
        sqe.prp2 = match pages {
            1 => 0,
            2 => u64::from_le_bytes(list[..8].try_into().unwrap_or_default()),
            _ => self.slots[index as usize].prp_list.iova(),
        }
        .into();
        self.submit(sqe, user)
    }

    /// Reap up to `max` completions, calling `done` for each; rings the CQ head doorbell once.
    pub fn poll(&mut self, max: usize, mut done: impl FnMut(Request)) -> usize {
        let mut n = 0;
        let base = self.cq.as_ptr();
        while n < max {
            let off = self.cq_head as usize * 16;
            // SAFETY: reading the CQ entry's status word inside our ring with a volatile load
            // (the device writes it); 2-byte aligned.
            #[allow(clippy::cast_ptr_alignment)]
            let status = unsafe { std::ptr::read_volatile(base.add(off + 14).cast::<u16>()) };
            if (status & 1 == 1) != self.phase {
                break;
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            // SAFETY: the entry lies in our ring (cq_head < size) of 16-byte entries, so
            // dword 0 (4-byte aligned) and the command id (2-byte aligned) are inside it;
            // volatile loads of what the device wrote before the phase tag (fence above).
            #[allow(clippy::cast_ptr_alignment)]
            let (dw0, cid) = unsafe {
                (
                    std::ptr::read_volatile(base.add(off).cast::<u32>()),
                    std::ptr::read_volatile(base.add(off + 12).cast::<u16>()),
                )
            };
            let (dw0, cid) = (u32::from_le(dw0), u16::from_le(cid));
            self.cq_head += 1;
            if self.cq_head == self.size {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            n += 1;
            let index = self.index_of(cid);
            let Some(slot) = self.slots.get_mut(index).filter(|s| s.busy && s.cid == cid) else {
                self.stale += 1;
                if self.stale <= 8 {
                    log::error!(
                        "queue {}: completion for command id {cid:#06x}, not in flight (posted twice, or for an earlier use)",
                        self.qid
                    );
                }
                continue;
            };
            slot.busy = false;
            let user = slot.user;
            self.free.push(index as u16);
            done(Request {
                user,
                status: Status::from_cqe_bits(u16::from_le(status)),
                dw0,
                slot: index as u16,
            });
        }
        if n > 0
            && self
                .shadow
                .as_ref()
                .is_none_or(|s| s.1.update(self.cq_head))
        {
            // SAFETY: cq_db points at this queue's doorbell in the live mapping.
            unsafe { std::ptr::write_volatile(self.cq_db, u32::from(self.cq_head)) };
        }
        n
    }

    /// Read (`write = false`) or Write `blocks` blocks at `lba` of namespace `nsid` to or from
    /// `len` bytes at `iova`.
    #[allow(clippy::too_many_arguments)]
    pub fn read_write(
        &mut self,
        write: bool,
        nsid: u32,
        lba: u64,
        blocks: u32,
        iova: u64,
        len: u64,
        user: u64,
    ) -> Result<u16, DriverError> {
        self.read_write_fua(write, false, nsid, lba, blocks, iova, len, user)
    }

    /// [`Self::read_write`] with Force Unit Access (NVM command set §3.2.6, CDW12 bit 30):
    /// the data is durable when the command completes.
    #[allow(clippy::too_many_arguments)]
    pub fn read_write_fua(
        &mut self,
        write: bool,
        fua: bool,
        nsid: u32,
        lba: u64,
        blocks: u32,
        iova: u64,
        len: u64,
        user: u64,
    ) -> Result<u16, DriverError> {
        let sqe = read_write_command(write, fua, nsid, lba, blocks)?;
        self.submit_with_data(sqe, iova, len, user)
    }

    /// Read or Write with data in device-address segments (see [`Self::submit_segments`]).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub fn read_write_segments(
        &mut self,
        write: bool,
        fua: bool,
        nsid: u32,
        lba: u64,
        blocks: u32,
        segs: &[(u64, u64)],
        user: u64,
    ) -> Result<u16, DriverError> {
        let sqe = read_write_command(write, fua, nsid, lba, blocks)?;
        self.submit_segments(sqe, segs, user)
    }

    /// True when `len` bytes at device address `addr` go in PRP1 and PRP2 without a list
    /// (a 4 KiB I/O: at most two pages, `addr` dword aligned).
    #[inline]
    pub fn fits_two_pages((addr, len): (u64, u64)) -> bool {
        len != 0 && addr.is_multiple_of(4) && (addr & (PAGE - 1)) + len <= 2 * PAGE
    }

    /// Read or Write of `len` bytes at device address `addr`, which
    /// [`fit two pages`](Self::fits_two_pages) (see [`Self::read_write_segments`] for any
    /// other). The hot path of a forwarding backend, inlined.
    #[allow(clippy::too_many_arguments, clippy::inline_always)]
    #[inline(always)]
    pub fn read_write_two_pages(
        &mut self,
        write: bool,
        fua: bool,
        nsid: u32,
        lba: u64,
        blocks: u32,
        (addr, len): (u64, u64),
        user: u64,
    ) -> Result<u16, DriverError> {
        debug_assert!(Self::fits_two_pages((addr, len)));
        let mut sqe = read_write_command(write, fua, nsid, lba, blocks)?;
        set_two_page_prps(&mut sqe, (addr, len));
        self.submit(sqe, user)
    }

    /// Flush namespace `nsid`.
    pub fn flush(&mut self, nsid: u32, user: u64) -> Result<u16, DriverError> {
        let mut sqe = Submission::default();
        sqe.opcode = nvm::FLUSH;
        sqe.nsid = nsid.into();
        self.submit(sqe, user)
    }

    /// Write Zeroes over `blocks` blocks at `lba`.
    pub fn write_zeroes(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u32,
        user: u64,
    ) -> Result<u16, DriverError> {
        self.submit(lba_command(nvm::WRITE_ZEROES, nsid, lba, blocks, 0)?, user)
    }

    /// Write Zeroes over `blocks` blocks at `lba` with Deallocate set (DEAC, NVM command set
    /// 1.0 §3.2.8): the device may deallocate the blocks instead of writing them, and they
    /// read as zeroes either way.
    pub fn write_zeroes_deallocate(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u32,
        user: u64,
    ) -> Result<u16, DriverError> {
        let sqe = lba_command(nvm::WRITE_ZEROES, nsid, lba, blocks, 1 << 25)?;
        self.submit(sqe, user)
    }

    /// Dataset Management, deallocate the `(lba, blocks)` ranges (at most 256) listed in
    /// `ranges_buf` by the caller via [`encode_dsm_ranges`].
    pub fn deallocate(
        &mut self,
        nsid: u32,
        ranges: u32,
        ranges_iova: u64,
        user: u64,
    ) -> Result<u16, DriverError> {
        if ranges == 0 || ranges > 256 {
            return Err(DriverError::Invalid(format!("{ranges} DSM ranges")));
        }
        let mut sqe = Submission::default();
        sqe.opcode = nvm::DATASET_MANAGEMENT;
        sqe.nsid = nsid.into();
        sqe.cdw10 = (ranges - 1).into();
        sqe.cdw11 = (1u32 << 2).into(); // AD: deallocate
        self.submit_with_data(sqe, ranges_iova, u64::from(ranges) * 16, user)
    }
}

/// A Read or Write (with Force Unit Access, CDW12 bit 30, when `fua`), data pointer unset.
#[allow(clippy::inline_always)] // once per command on a forwarding hop (callgrind)
#[inline(always)]
fn read_write_command(
    write: bool,
    fua: bool,
    nsid: u32,
    lba: u64,
    blocks: u32,
) -> Result<Submission, DriverError> {
    let opcode = if write { nvm::WRITE } else { nvm::READ };
    lba_command(opcode, nsid, lba, blocks, u32::from(fua) << 30)
}

/// PRP1 and PRP2 of `len` bytes at `addr` that
/// [fit two pages](QueuePair::fits_two_pages): PRP2 is the second page, or 0 when there is
/// none.
#[allow(clippy::inline_always)] // once per command on a forwarding hop (callgrind)
#[inline(always)]
fn set_two_page_prps(sqe: &mut Submission, (addr, len): (u64, u64)) {
    sqe.prp1 = addr.into();
    let second = (addr & !(PAGE - 1)) + PAGE;
    sqe.prp2 = if addr + len > second { second } else { 0 }.into();
}

/// An NVM command on `blocks` (1..=65536) blocks at `lba` of namespace `nsid`: SLBA in
/// CDW10-11, the 0's based block count in CDW12 bits 15:0, `cdw12_flags` (FUA, ...) above.
#[allow(clippy::inline_always)] // once per command on a forwarding hop (callgrind)
#[inline(always)]
fn lba_command(
    opcode: u8,
    nsid: u32,
    lba: u64,
    blocks: u32,
    cdw12_flags: u32,
) -> Result<Submission, DriverError> {
    if blocks == 0 || blocks > 65536 {
        return Err(DriverError::Invalid(format!("{blocks} blocks")));
    }
    let mut sqe = Submission::default();
    sqe.opcode = opcode;
    sqe.nsid = nsid.into();
    sqe.cdw10 = (lba as u32).into();
    sqe.cdw11 = ((lba >> 32) as u32).into();
    sqe.cdw12 = ((blocks - 1) | cdw12_flags).into();
    Ok(sqe)
}

/// Encode DSM ranges (context attributes 0, length in blocks, starting LBA) into `buf`.
pub fn encode_dsm_ranges(buf: &mut [u8], ranges: &[(u64, u32)]) {
    for (i, &(lba, blocks)) in ranges.iter().enumerate() {
        let e = &mut buf[i * 16..i * 16 + 16];
        e[0..4].copy_from_slice(&0u32.to_le_bytes());
        e[4..8].copy_from_slice(&blocks.to_le_bytes());
        e[8..16].copy_from_slice(&lba.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromBytes;

    /// The SQE at `index` of `qp`'s ring.
    fn sqe_at(qp: &QueuePair, index: usize) -> Submission {
        let mut raw = [0u8; 64];
        qp.sq.read(index * 64, &mut raw);
        Submission::read_from_bytes(&raw).unwrap()
    }

    #[test]
    fn segments_become_prp_entries_or_are_refused() {
        let dma = DmaMemory::new(2 << 20, 0x1000_0000).unwrap();
        let mut doorbells = [0u32; 8];
        let mut qp = QueuePair::new(&dma, 1, 8, doorbells.as_mut_ptr(), 4).unwrap();
        let prps = |qp: &mut QueuePair, segs: &[(u64, u64)]| {
            let cid = qp.submit_segments(Submission::default(), segs, 0)?;
            let s = sqe_at(qp, (qp.sq_tail as usize + 7) % 8);
            assert_eq!(s.cid.get(), cid);
            Ok::<_, DriverError>((s.prp1.get(), s.prp2.get(), cid))
        };
        // one page, aligned or not; a page boundary crossed: PRP2 is the second page
        let (p1, p2, _) = prps(&mut qp, &[(0x10000, 4096)]).unwrap();
        assert_eq!((p1, p2), (0x10000, 0));
        let (p1, p2, _) = prps(&mut qp, &[(0x10200, 4096)]).unwrap();
        assert_eq!((p1, p2), (0x10200, 0x11000));
        let (p1, p2, _) = prps(&mut qp, &[(0x10ffc, 8)]).unwrap();
        assert_eq!((p1, p2), (0x10ffc, 0x11000));
        // three pages: PRP2 points at the command's list
        let (p1, p2, cid) = prps(&mut qp, &[(0x10200, 8192)]).unwrap();
        let list = &qp.slots[qp.index_of(cid)].prp_list;
        assert_eq!((p1, p2), (0x10200, list.iova()));
        let mut entries = [0u8; 16];
        list.read(0, &mut entries);
        assert_eq!(entries[..8], 0x11000u64.to_le_bytes());
        assert_eq!(entries[8..], 0x12000u64.to_le_bytes());
        // two segments, one page each
        let (p1, p2, _) = prps(&mut qp, &[(0x10000, 4096), (0x30000, 4096)]).unwrap();
        assert_eq!((p1, p2), (0x10000, 0x30000));
        // not expressible: refused, nothing queued
        let tail = qp.sq_tail;
        for bad in [
            &[(0x10001u64, 512u64)][..],
            &[(0x10000, 0)],
            &[(0x10000, 2048), (0x30000, 4096)],
            &[],
        ] {
            assert!(prps(&mut qp, bad).is_err(), "{bad:?}");
        }
        assert_eq!(qp.sq_tail, tail);
    }

    /// The device writes a completion for `cid` at the queue's CQ slot `at` with `phase`.
    fn post(qp: &mut QueuePair, at: usize, cid: u16, phase: bool) {
        let mut cqe = [0u8; 16];
        cqe[12..14].copy_from_slice(&cid.to_le_bytes());
        cqe[14] = u8::from(phase);
        qp.cq.as_mut_slice()[at * 16..at * 16 + 16].copy_from_slice(&cqe);
    }

    #[test]
    fn a_completion_posted_twice_or_for_an_earlier_use_is_stale() {
        let dma = DmaMemory::new(1 << 20, 0x1000_0000).unwrap();
        let mut doorbells = [0u32; 8];
        let mut qp = QueuePair::new(&dma, 1, 8, doorbells.as_mut_ptr(), 4).unwrap();
        let first = qp.submit(Submission::default(), 1).unwrap();
        post(&mut qp, 0, first, true);
        let mut got = Vec::new();
        assert_eq!(qp.poll(8, |r| got.push(r.user)), 1);
        assert_eq!(got, [1]);
        // the same slot again: a new command id, same index
        let second = qp.submit(Submission::default(), 2).unwrap();
        assert_ne!(second, first);
        assert_eq!(qp.index_of(second), qp.index_of(first));
        // the first completion once more, then the real one
        post(&mut qp, 1, first, true);
        post(&mut qp, 2, second, true);
        got.clear();
        qp.poll(8, |r| got.push(r.user));
        assert_eq!(got, [2]);
        assert_eq!(qp.stale_completions(), 1);
        // and the second one twice: nothing in flight matches
        post(&mut qp, 3, second, true);
        qp.poll(8, |r| got.push(r.user));
        assert_eq!((got.len(), qp.stale_completions()), (1, 2));
        assert_eq!(qp.outstanding(), 0);
    }
}
