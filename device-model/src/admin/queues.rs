//! Create / Delete I/O Submission and Completion Queues (NVMe base 2.0 §5.4-5.7), with the
//! command-specific statuses of their figures: Invalid Queue Identifier for a QID (or an SQ's
//! CQID) of 0, beyond the queues allocated or already in use; Completion Queue Invalid for a
//! CQID in range whose queue does not exist; Invalid Queue Size; Invalid Interrupt Vector;
//! Invalid Queue Deletion for a CQ that still has SQs.

use nvme_spec::{Status, Submission};

use crate::controller::{Controller, Outcome};
use crate::memory::MemoryMap;
use crate::queue::{CompletionQueue, SubmissionQueue};
use crate::shadow_doorbell::DoorbellSeen;

impl Controller {
    /// Common QID / QSIZE / base checks. `max_qid` is the granted queue count.
    #[allow(clippy::too_many_arguments)]
    fn check_new_queue(
        &self,
        qid: u16,
        qsize: u32,
        base: u64,
        entry: u64,
        pc: bool,
        exists: bool,
        max_qid: u16,
        mem: &MemoryMap,
    ) -> Status {
        if qid == 0 || qid > max_qid || qid as usize >= self.sqs.len() || exists {
            return Status::INVALID_QID;
        }
        if qsize < 2 || qsize > u32::from(self.cfg.mqes) + 1 {
            return Status::INVALID_QUEUE_SIZE;
        }
        if !pc {
            return Status::INVALID_FIELD; // CAP.CQR: queues must be physically contiguous
        }
        if base & (self.page_size - 1) != 0 {
            return Status::INVALID_FIELD;
        }
        if mem
            .check_range(base, u64::from(qsize) * entry, entry == 16)
            .is_err()
        {
            return Status::INVALID_FIELD;
        }
        Status::SUCCESS
    }

    /// A new queue's doorbell starts at 0 in the register page and, when configured, in the
    /// shadow page: a value left from an earlier queue with the same id must not count.
    fn attach_doorbell(
        &self,
        index: usize,
        seen: &mut DoorbellSeen,
        mem: &MemoryMap,
    ) -> Result<(), Status> {
        self.doorbells.store(index, 0);
        if let Some(buf) = &self.shadow {
            *seen = buf
                .attach(mem, index, 0)
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
        }
        Ok(())
    }

    pub(crate) fn create_io_cq(&mut self, sqe: &Submission, mem: &MemoryMap) -> Status {
        let cdw10 = sqe.cdw10.get();
        let cdw11 = sqe.cdw11.get();
        let qid = cdw10 as u16;
        let qsize = (cdw10 >> 16) + 1;
        let pc = cdw11 & 1 != 0;
        let ien = cdw11 & 2 != 0;
        let iv = (cdw11 >> 16) as u16;
        let base = sqe.prp1.get();
        let exists = self.cqs.get(qid as usize).is_some_and(Option::is_some);
        let max = self.admin.features.granted().1 + 1;
        let s = self.check_new_queue(qid, qsize, base, 16, pc, exists, max, mem);
        if !s.is_success() {
            return s;
        }
        if iv >= crate::pci::MSIX_VECTORS {
            return Status::INVALID_INTERRUPT_VECTOR;
        }
        let mut cq = CompletionQueue::new(qid, base, qsize, iv, ien);
        if let Err(s) = self.attach_doorbell(2 * qid as usize + 1, &mut cq.doorbell, mem) {
            return s;
        }
        self.cqs[qid as usize] = Some(cq);
        self.active_cqs.push(qid);
        log::debug!("created CQ {qid}: {qsize} entries at {base:#x}, vector {iv}, irq {ien}");
        Status::SUCCESS
    }

    pub(crate) fn create_io_sq(&mut self, sqe: &Submission, mem: &MemoryMap) -> Status {
        let cdw10 = sqe.cdw10.get();
        let cdw11 = sqe.cdw11.get();
        let qid = cdw10 as u16;
        let qsize = (cdw10 >> 16) + 1;
        let pc = cdw11 & 1 != 0;
        let cqid = (cdw11 >> 16) as u16;
        let base = sqe.prp1.get();
        let exists = self.sqs.get(qid as usize).is_some_and(Option::is_some);
        let max = self.admin.features.granted().0 + 1;
        let s = self.check_new_queue(qid, qsize, base, 64, pc, exists, max, mem);
        if !s.is_success() {
            return s;
        }
        // CQID 0 is the admin CQ; beyond the CQs allocated it names no queue (§5.5, CQID)
        let max_cqid = self.admin.features.granted().1 + 1;
        if cqid == 0 || cqid > max_cqid || cqid as usize >= self.cqs.len() {
            return Status::INVALID_QID;
        }
        if !self.cqs.get(cqid as usize).is_some_and(Option::is_some) {
            return Status::INVALID_CQ;
        }
        let mut sq = SubmissionQueue::new(qid, base, qsize, cqid);
        if let Err(s) = self.attach_doorbell(2 * qid as usize, &mut sq.doorbell, mem) {
            return s;
        }
        if let Some(cq) = self.cqs[cqid as usize].as_mut() {
            cq.sq_count += 1;
        }
        self.sqs[qid as usize] = Some(sq);
        self.active_sqs.push(qid);
        log::debug!("created SQ {qid}: {qsize} entries at {base:#x}, CQ {cqid}");
        Status::SUCCESS
    }

    pub(crate) fn delete_io_sq(&mut self, slot: u16, sqe: &Submission) -> Outcome {
        let qid = sqe.cdw10.get() as u16;
        if qid == 0 {
            return Outcome::status(Status::INVALID_QID);
        }
        let Some(sq) = self.sqs.get_mut(qid as usize).and_then(Option::as_mut) else {
            return Outcome::status(Status::INVALID_QID);
        };
        if sq.deleting.is_some() {
            return Outcome::status(Status::INVALID_QID);
        }
        if sq.in_flight() > 0 {
            // complete the deletion once the commands in flight finish (§5.7)
            sq.deleting = Some(slot);
            return Outcome::Pending;
        }
        self.remove_sq(qid);
        Outcome::status(Status::SUCCESS)
    }

    pub(crate) fn delete_io_cq(&mut self, sqe: &Submission) -> Status {
        let qid = sqe.cdw10.get() as u16;
        if qid == 0 {
            return Status::INVALID_QID;
        }
        let Some(cq) = self.cqs.get(qid as usize).and_then(Option::as_ref) else {
            return Status::INVALID_QID;
        };
        if cq.sq_count > 0 {
            return Status::INVALID_QUEUE_DELETION;
        }
        self.cqs[qid as usize] = None;
        self.active_cqs.retain(|&q| q != qid);
        Status::SUCCESS
    }
}
