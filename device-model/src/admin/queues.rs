//! Create / Delete I/O Submission and Completion Queues (NVMe base 2.0 §5.4-5.7), with the
//! command-specific statuses of their figures: Invalid Queue Identifier for a QID (or an SQ's
//! CQID) of 0, beyond the queues allocated or already in use; Completion Queue Invalid for a
//! CQID in range whose queue does not exist; Invalid Queue Size; Invalid Interrupt Vector;
//! Invalid Queue Deletion for a CQ that still has SQs.
//!
//! The handlers see the queues, the limits a new queue is checked against and the doorbells,
//! nothing else of the controller.

use nvme_spec::{Status, Submission};

use crate::controller::Outcome;
use crate::doorbell::Doorbells;
use crate::memory::MemoryMap;
use crate::queue::{CompletionQueue, Queues, SubmissionQueue};
use crate::shadow_doorbell::{DoorbellSeen, ShadowDoorbells};

/// What a new I/O queue is checked against.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueLimits {
    /// CAP.MQES: entries per queue, zero-based.
    pub mqes: u16,
    /// The memory page size CC.MPS set: queue bases are aligned to it.
    pub page_size: u64,
    /// I/O SQs and CQs granted by Number of Queues (zero-based).
    pub granted: (u16, u16),
}

/// Where a new queue's doorbell lives: the register page and, when configured, the shadow
/// page (Doorbell Buffer Config).
#[derive(Clone, Copy)]
pub(crate) struct DoorbellPages<'a> {
    pub registers: &'a Doorbells,
    pub shadow: Option<&'a ShadowDoorbells>,
}

impl DoorbellPages<'_> {
    /// A new queue's doorbell starts at 0 in the register page and in the shadow page: a
    /// value left from an earlier queue with the same id must not count.
    fn attach(&self, index: usize, seen: &mut DoorbellSeen, mem: &MemoryMap) -> Result<(), Status> {
        self.registers.store(index, 0);
        if let Some(buf) = self.shadow {
            *seen = buf
                .attach(mem, index, 0)
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
        }
        Ok(())
    }
}

/// The checks Create I/O SQ and CQ share: QID, QSIZE, PC, base alignment and range.
struct NewQueue {
    qid: u16,
    qsize: u32,
    base: u64,
    /// Entry size: 64 (SQ) or 16 (CQ).
    entry: u64,
    pc: bool,
}

impl NewQueue {
    /// The queue Create I/O CQ (`entry` 16) or SQ (64) asks for: QID and QSIZE in CDW10,
    /// PC in CDW11 bit 0, the base in PRP1.
    fn parse(sqe: &Submission, entry: u64) -> Self {
        let cdw10 = sqe.cdw10.get();
        Self {
            qid: cdw10 as u16,
            qsize: (cdw10 >> 16) + 1,
            base: sqe.prp1.get(),
            entry,
            pc: sqe.cdw11.get() & 1 != 0,
        }
    }

    fn check(
        &self,
        queues: &Queues,
        exists: bool,
        max_qid: u16,
        limits: &QueueLimits,
        mem: &MemoryMap,
    ) -> Status {
        let qid = self.qid;
        if qid == 0 || qid > max_qid || qid as usize >= queues.capacity() || exists {
            return Status::INVALID_QID;
        }
        if self.qsize < 2 || self.qsize > u32::from(limits.mqes) + 1 {
            return Status::INVALID_QUEUE_SIZE;
        }
        if !self.pc {
            return Status::INVALID_FIELD; // CAP.CQR: queues must be physically contiguous
        }
        if self.base & (limits.page_size - 1) != 0 {
            return Status::INVALID_FIELD;
        }
        let len = u64::from(self.qsize) * self.entry;
        if mem.check_range(self.base, len, self.entry == 16).is_err() {
            return Status::INVALID_FIELD;
        }
        Status::SUCCESS
    }
}

/// Create I/O Completion Queue (§5.4).
pub(crate) fn create_io_cq(
    queues: &mut Queues,
    limits: &QueueLimits,
    doorbells: DoorbellPages<'_>,
    sqe: &Submission,
    mem: &MemoryMap,
) -> Status {
    let cdw11 = sqe.cdw11.get();
    let new = NewQueue::parse(sqe, 16);
    let ien = cdw11 & 2 != 0;
    let iv = (cdw11 >> 16) as u16;
    let exists = queues.cq(new.qid).is_some();
    let s = new.check(queues, exists, limits.granted.1 + 1, limits, mem);
    if !s.is_success() {
        return s;
    }
    if iv >= crate::pci::MSIX_VECTORS {
        return Status::INVALID_INTERRUPT_VECTOR;
    }
    let mut cq = CompletionQueue::new(new.qid, new.base, new.qsize, iv, ien);
    if let Err(s) = doorbells.attach(2 * new.qid as usize + 1, &mut cq.doorbell, mem) {
        return s;
    }
    queues.insert_cq(cq);
    log::debug!(
        "created CQ {}: {} entries at {:#x}, vector {iv}, irq {ien}",
        new.qid,
        new.qsize,
        new.base
    );
    Status::SUCCESS
}

/// Create I/O Submission Queue (§5.5).
pub(crate) fn create_io_sq(
    queues: &mut Queues,
    limits: &QueueLimits,
    doorbells: DoorbellPages<'_>,
    sqe: &Submission,
    mem: &MemoryMap,
) -> Status {
    let cdw11 = sqe.cdw11.get();
    let new = NewQueue::parse(sqe, 64);
    let cqid = (cdw11 >> 16) as u16;
    let exists = queues.sq(new.qid).is_some();
    let s = new.check(queues, exists, limits.granted.0 + 1, limits, mem);
    if !s.is_success() {
        return s;
    }
    // CQID 0 is the admin CQ; beyond the CQs allocated it names no queue (§5.5, CQID)
    let max_cqid = limits.granted.1 + 1;
    if cqid == 0 || cqid > max_cqid || cqid as usize >= queues.capacity() {
        return Status::INVALID_QID;
    }
    if queues.cq(cqid).is_none() {
        return Status::INVALID_CQ;
    }
    let mut sq = SubmissionQueue::new(new.qid, new.base, new.qsize, cqid);
    if let Err(s) = doorbells.attach(2 * new.qid as usize, &mut sq.doorbell, mem) {
        return s;
    }
    queues.insert_sq(sq);
    log::debug!(
        "created SQ {}: {} entries at {:#x}, CQ {cqid}",
        new.qid,
        new.qsize,
        new.base
    );
    Status::SUCCESS
}

/// Delete I/O Submission Queue (§5.7): at once when nothing of it is in flight, else
/// `Pending` until its last command completed (the completion path finishes it).
pub(crate) fn delete_io_sq(queues: &mut Queues, slot: u16, sqe: &Submission) -> Outcome {
    let qid = sqe.cdw10.get() as u16;
    if qid == 0 {
        return Outcome::status(Status::INVALID_QID);
    }
    let Some(sq) = queues.sq_mut(qid) else {
        return Outcome::status(Status::INVALID_QID);
    };
    if sq.deleting.is_some() {
        return Outcome::status(Status::INVALID_QID);
    }
    if sq.in_flight() > 0 {
        sq.deleting = Some(slot);
        return Outcome::Pending;
    }
    queues.remove_sq(qid);
    Outcome::status(Status::SUCCESS)
}

/// Delete I/O Completion Queue (§5.6).
pub(crate) fn delete_io_cq(queues: &mut Queues, sqe: &Submission) -> Status {
    let qid = sqe.cdw10.get() as u16;
    if qid == 0 {
        return Status::INVALID_QID;
    }
    let Some(cq) = queues.cq(qid) else {
        return Status::INVALID_QID;
    };
    if cq.sq_count > 0 {
        return Status::INVALID_QUEUE_DELETION;
    }
    queues.remove_cq(qid);
    Status::SUCCESS
}
