//! NVM command set I/O commands (NVM command set 1.0 §3): Read, Write (FUA), Flush,
//! Write Zeroes, Dataset Management (deallocate) and Compare. All of them go to the
//! backends asynchronously; the ones that take several requests (Flush of every namespace,
//! Dataset Management) or check the data (Compare) are in [`crate::compound`].

use std::sync::Arc;

use nvme_spec::opcode::nvm as op;
use nvme_spec::{Status, Submission};

use crate::backend::{IoOp, IoRequest};
use crate::compound::Part;
use crate::controller::{Controller, Outcome};
use crate::dptr;
use crate::memory::MemoryMap;

impl Controller {
    /// Execute one I/O command fetched into `slot` of SQ `qid`.
    pub(crate) fn io_command(
        &mut self,
        qid: u16,
        slot: u16,
        sqe: &Submission,
        mem: &Arc<MemoryMap>,
    ) -> Outcome {
        if sqe.fuse() != 0 {
            return Outcome::status(Status::INVALID_FIELD);
        }
        let nsid = sqe.nsid.get();
        if sqe.opcode == op::FLUSH && nsid == u32::MAX {
            if self.wait_for_room(qid, slot, sqe) {
                return Outcome::Pending;
            }
            // every namespace at once (base 2.0 §7.1); done when the last backend answered
            let parts: Vec<Part> = self
                .namespaces
                .iter()
                .map(|ns| Part {
                    nsid: ns.nsid,
                    op: IoOp::Flush,
                    offset: 0,
                })
                .collect();
            let n = parts.len();
            return self.start_parts(qid, slot, parts, n);
        }
        let Some(ns_idx) = self.namespace_index(nsid) else {
            return Outcome::status(Status::INVALID_NAMESPACE);
        };
        match sqe.opcode {
            op::READ | op::WRITE => self.read_write(qid, slot, ns_idx, sqe, mem),
            op::FLUSH => {
                let tag = self.tag(qid, slot);
                let ns = &mut self.namespaces[ns_idx];
                let req = IoRequest {
                    tag,
                    op: IoOp::Flush,
                    offset: 0,
                    iov: crate::dptr::GuestBuffers::EMPTY,
                };
                match ns.backend.submit(&req) {
                    Ok(()) => Outcome::Pending,
                    Err(s) => Outcome::status(s),
                }
            }
            op::WRITE_ZEROES => {
                let (offset, len) = match self.lba_range(ns_idx, sqe) {
                    Ok(r) => r,
                    Err(s) => return Outcome::status(s),
                };
                // asynchronous like a write: a backend on a device or a network must not
                // hold the reactor; SMART counts it at a successful completion (io_finished)
                let tag = self.tag(qid, slot);
                let Some(sq) = self.sqs[qid as usize].as_mut() else {
                    return Outcome::status(Status::INTERNAL_ERROR);
                };
                sq.slots[slot as usize].bytes = len;
                let req = IoRequest {
                    tag,
                    op: IoOp::WriteZeroes { len },
                    offset,
                    iov: crate::dptr::GuestBuffers::EMPTY,
                };
                match self.namespaces[ns_idx].backend.submit(&req) {
                    Ok(()) => Outcome::Pending,
                    Err(s) => Outcome::status(s),
                }
            }
            op::DATASET_MANAGEMENT => self.dataset_management(qid, slot, ns_idx, sqe, mem),
            op::COMPARE => self.compare(qid, slot, ns_idx, sqe, mem),
            _ => Outcome::status(Status::INVALID_OPCODE),
        }
    }

    /// Byte offset and length of the LBA range in CDW10-12, checked against the namespace.
    pub(crate) fn lba_range(&self, ns_idx: usize, sqe: &Submission) -> Result<(u64, u64), Status> {
        let ns = &self.namespaces[ns_idx];
        let slba = u64::from(sqe.cdw10.get()) | (u64::from(sqe.cdw11.get()) << 32);
        let nlb = u64::from(sqe.cdw12.get() & 0xffff) + 1;
        match slba.checked_add(nlb) {
            Some(end) if end <= ns.blocks() => Ok((slba << ns.lba_shift, nlb << ns.lba_shift)),
            _ => Err(Status::LBA_OUT_OF_RANGE),
        }
    }

    pub(crate) fn max_transfer(&self) -> u64 {
        4096u64 << self.cfg.mdts
    }

    fn read_write(
        &mut self,
        qid: u16,
        slot: u16,
        ns_idx: usize,
        sqe: &Submission,
        mem: &Arc<MemoryMap>,
    ) -> Outcome {
        let (offset, len) = match self.lba_range(ns_idx, sqe) {
            Ok(r) => r,
            Err(s) => return Outcome::status(s),
        };
        if len > self.max_transfer() {
            return Outcome::status(Status::INVALID_FIELD);
        }
        self.qos.charge_bytes(len);
        let is_read = sqe.opcode == op::READ;
        let fua = sqe.cdw12.get() & (1 << 30) != 0;
        let page_size = self.page_size;
        let tag = self.tag(qid, slot);
        let Some(sq) = self.sqs[qid as usize].as_mut() else {
            return Outcome::status(Status::INTERNAL_ERROR);
        };
        let ctx = &mut sq.slots[slot as usize];
        if !ctx.iov.has_storage() {
            let block = self.iov_pool.take();
            ctx.iov.give_storage(block);
        }
        if let Err(s) = dptr::map_data(mem, sqe, len, page_size, is_read, true, &mut ctx.iov) {
            return Outcome::status(s);
        }
        ctx.bytes = len;
        ctx.mem = Some(Arc::clone(mem));
        let req = IoRequest {
            tag,
            op: if is_read {
                IoOp::Read
            } else {
                IoOp::Write { fua }
            },
            offset,
            iov: ctx.iov.buffers_in(mem),
        };
        match self.namespaces[ns_idx].backend.submit(&req) {
            Ok(()) => Outcome::Pending,
            Err(s) => Outcome::status(s),
        }
    }

    /// Dataset Management (§3.2.3): only the Deallocate attribute does anything. The ranges
    /// are checked first (any out of range fails the command before anything is
    /// deallocated), then deallocated one after the other.
    fn dataset_management(
        &mut self,
        qid: u16,
        slot: u16,
        ns_idx: usize,
        sqe: &Submission,
        mem: &MemoryMap,
    ) -> Outcome {
        if self.wait_for_room(qid, slot, sqe) {
            return Outcome::Pending;
        }
        let nr = (sqe.cdw10.get() & 0xff) as usize + 1;
        let deallocate = sqe.cdw11.get() & (1 << 2) != 0;
        let len = nr * 16;
        let s = self.copy_from_host(sqe, len, mem, true);
        if !s.is_success() {
            return Outcome::status(s);
        }
        if !deallocate {
            return Outcome::status(Status::SUCCESS);
        }
        let ns = &self.namespaces[ns_idx];
        let blocks = ns.blocks();
        let mut parts = Vec::with_capacity(nr);
        for e in self.bounce[..len].chunks_exact(16) {
            let nlb = u64::from(u32::from_le_bytes([e[4], e[5], e[6], e[7]]));
            let slba = u64::from_le_bytes([e[8], e[9], e[10], e[11], e[12], e[13], e[14], e[15]]);
            match slba.checked_add(nlb) {
                Some(end) if end <= blocks => {}
                _ => return Outcome::status(Status::LBA_OUT_OF_RANGE),
            }
            if nlb > 0 {
                parts.push(Part {
                    nsid: ns.nsid,
                    op: IoOp::Deallocate {
                        len: nlb << ns.lba_shift,
                    },
                    offset: slba << ns.lba_shift,
                });
            }
        }
        // one range at a time: up to 256 ranges never crowd a device's or a target's queue
        self.start_parts(qid, slot, parts, 1)
    }
}
