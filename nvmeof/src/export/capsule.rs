//! Command capsules and host data: checking a command's data descriptor, giving it a slot,
//! taking its data (in-capsule, or asked for with R2T and received in H2CData PDUs) and
//! placing it in the controller's submission queue.

use std::time::Instant;

use nvme_spec::fabrics::{self, sgl_id};
use nvme_spec::opcode::admin as op;
use nvme_spec::tcp::fes;
use nvme_spec::{Completion, Status, Submission};

use crate::pdu::Pdu;

use super::connection::{Conn, Role};
use super::discovery::Answer;
use super::event_loop::Target;
use super::{Owner, Slot};

/// Admin opcodes with no meaning over a fabric: Delete/Create I/O SQ/CQ, Doorbell Buffer
/// Config.
const PCIE_ONLY: [u8; 5] = [
    op::DELETE_IO_SQ,
    op::CREATE_IO_SQ,
    op::DELETE_IO_CQ,
    op::CREATE_IO_CQ,
    op::DOORBELL_BUFFER_CONFIG,
];

/// Where a command's data is: `len` bytes, in the capsule or to be moved by PDUs.
pub(super) struct DataDesc {
    pub len: usize,
    pub in_capsule: bool,
}

/// Check the SGL of a command from the host: a Data Block with offset 0 describing exactly
/// the in-capsule data, or where the transport moves the data: over TCP a Transport SGL
/// Data Block (TCP transport 1.0 §3.3.2), over RDMA (`keyed`) a Keyed SGL Data Block
/// (RDMA transport 1.0 §3.3).
pub(super) fn data_desc(
    sqe: &Submission,
    in_capsule: &[u8],
    keyed: bool,
) -> Result<DataDesc, Status> {
    if keyed {
        use crate::rdma::sgl::{DataPointer, data_pointer};
        return Ok(match data_pointer(sqe, in_capsule.len())? {
            DataPointer::None => DataDesc {
                len: 0,
                in_capsule: false,
            },
            DataPointer::InCapsule { len } => DataDesc {
                len,
                in_capsule: true,
            },
            DataPointer::Keyed { len, .. } => DataDesc {
                len,
                in_capsule: false,
            },
        });
    }
    if sqe.flags >> 6 != 1 {
        // PRPs (or reserved PSDT) have no meaning over a fabric
        return Err(Status::INVALID_FIELD);
    }
    let raw = sqe.prp2.get();
    let len = raw as u32 as usize;
    match (raw >> 56) as u8 {
        sgl_id::INCAPSULE => {
            if sqe.prp1.get() != 0 {
                return Err(Status::SGL_OFFSET_INVALID);
            }
            if len != in_capsule.len() {
                return Err(Status::DATA_SGL_LENGTH_INVALID);
            }
            Ok(DataDesc {
                len,
                in_capsule: true,
            })
        }
        sgl_id::TRANSPORT if in_capsule.is_empty() => Ok(DataDesc {
            len,
            in_capsule: false,
        }),
        sgl_id::TRANSPORT => Err(Status::DATA_SGL_LENGTH_INVALID),
        0 if len == 0 && in_capsule.is_empty() => Ok(DataDesc {
            len: 0,
            in_capsule: false,
        }),
        _ => Err(Status::INVALID_SGL_TYPE),
    }
}

impl Target {
    /// A CapsuleCmd from connection `i`.
    pub fn capsule(&mut self, i: usize, sqe: Submission, data: &[u8]) {
        if sqe.opcode == fabrics::OPCODE {
            self.fabrics_command(i, sqe, data);
            return;
        }
        let Some(c) = self.conns[i].as_mut() else {
            return;
        };
        let cid = sqe.cid.get();
        match &c.role {
            Role::Initializing => {
                self.fatal(i, fes::PDU_SEQUENCE_ERROR, 0, "command before ICReq");
            }
            Role::AwaitingConnect | Role::Connecting { .. } => {
                self.respond(i, cid, Status::COMMAND_SEQUENCE_ERROR, 0);
            }
            Role::Discovery(_) => self.discovery_command(i, &sqe, data),
            &Role::Queue { export, qid } => self.host_command(i, export, qid, sqe, data),
        }
    }

    fn discovery_command(&mut self, i: usize, sqe: &Submission, data: &[u8]) {
        let cid = sqe.cid.get();
        let keyed = self.conns[i].as_ref().is_some_and(Conn::keyed);
        let len = match data_desc(sqe, data, keyed) {
            Ok(d) if d.in_capsule && d.len > 0 => {
                self.respond(i, cid, Status::INVALID_FIELD, 0);
                return;
            }
            Ok(d) => d.len,
            Err(s) => {
                self.respond(i, cid, s, 0);
                return;
            }
        };
        let listed = self.discovery_records(i);
        let Some(c) = self.conns[i].as_mut() else {
            return;
        };
        let Role::Discovery(d) = &c.role else {
            return;
        };
        match d.command(sqe, &listed, self.genctr) {
            Answer::Parked => {}
            Answer::Done(status, result, out) => {
                if status.is_success() && !out.is_empty() {
                    let n = out.len().min(len);
                    if let Some(c) = self.conns[i].as_mut() {
                        c.send_data(sqe, &out[..n]);
                    }
                }
                self.respond(i, cid, status, result);
            }
        }
    }

    /// A command for an exported controller's queue `qid`.
    fn host_command(&mut self, i: usize, e: usize, qid: u16, sqe: Submission, data: &[u8]) {
        let cid = sqe.cid.get();
        if qid == 0 && PCIE_ONLY.contains(&sqe.opcode) {
            // queues are created by Connect, doorbells are PCIe registers (base 2.0 §6)
            self.respond(i, cid, Status::INVALID_OPCODE, 0);
            return;
        }
        let slot_bytes = self.exports[e].host.slot_bytes();
        let keyed = self.conns[i].as_ref().is_some_and(Conn::keyed);
        let desc = match data_desc(&sqe, data, keyed) {
            Ok(d) => d,
            Err(s) => {
                self.respond(i, cid, s, 0);
                return;
            }
        };
        // data direction from the opcode's low bits (base 2.0 §5, Figure 83 note)
        let (len, to_host, to_ctrl) = match sqe.opcode & 3 {
            0 => (0, false, false),
            1 => (desc.len, false, true),
            2 if !desc.in_capsule => (desc.len, true, false),
            _ => {
                self.respond(i, cid, Status::INVALID_FIELD, 0);
                return;
            }
        };
        if len > slot_bytes {
            self.respond(i, cid, Status::INVALID_FIELD, 0);
            return;
        }
        // a Read moves exactly its blocks: an SGL of another length is refused here, as
        // nvmet does (a longer one would send back bytes the command never wrote)
        let mut exact = false;
        if qid > 0 && sqe.opcode == nvme_spec::opcode::nvm::READ {
            let nsid = sqe.nsid.get();
            if let Some(&(_, shift)) = self.exports[e].lba_shifts.iter().find(|n| n.0 == nsid) {
                let blocks = u64::from(sqe.cdw12.get() & 0xffff) + 1;
                if blocks << shift != len as u64 {
                    self.respond(i, cid, Status::DATA_SGL_LENGTH_INVALID, 0);
                    return;
                }
                exact = true;
            }
        }
        let Some(assoc) = self.exports[e].assoc.as_mut() else {
            return;
        };
        if qid == 0 {
            assoc.last_admin = Instant::now();
        }
        if !assoc.enabled {
            // NVMe-oF 1.1 §3.5: only Fabrics commands until the host sets CC.EN
            self.respond(i, cid, Status::COMMAND_SEQUENCE_ERROR, 0);
            return;
        }
        let Some(q) = assoc.queues[qid as usize].as_mut() else {
            return;
        };
        if !q.live {
            // the controller was disabled under this queue (CC.EN = 0)
            self.respond(i, cid, Status::COMMAND_SEQUENCE_ERROR, 0);
            return;
        }
        if q.cid_taken(cid) {
            self.respond(i, cid, Status::CID_CONFLICT, 0);
            return;
        }
        let Some(slot) = q.free.pop() else {
            self.fatal(
                i,
                fes::PDU_SEQUENCE_ERROR,
                0,
                "more commands than the queue's size",
            );
            return;
        };
        q.set_cid(cid, true);
        let awaiting = to_ctrl && !desc.in_capsule && len > 0;
        q.slots[slot as usize] = Slot {
            owner: Owner::Host { cid },
            len,
            to_host,
            received: 0,
            awaiting_data: awaiting,
            parked: qid == 0 && sqe.opcode == op::ASYNC_EVENT_REQUEST,
            digest_failed: false,
            sqe,
        };
        if to_ctrl && desc.in_capsule {
            self.exports[e].host.write_slot(qid, slot, 0, &data[..len]);
        } else if to_host && !exact {
            // all `len` bytes go back to this host, even if the command moves fewer:
            // nothing left in the slot by an earlier command may go with them
            self.exports[e].host.zero_slot(qid, slot, len);
        }
        if awaiting {
            self.request_data(i, e, qid, slot, len);
        } else {
            self.submit(e, qid, slot);
        }
    }

    /// Ask the host for the `len` bytes of data of the write in `slot`: over TCP an R2T
    /// (H2CData PDUs bring it), over RDMA an RDMA Read into the slot's buffer.
    #[cfg_attr(not(feature = "rdma"), allow(clippy::needless_return))]
    fn request_data(&mut self, i: usize, e: usize, qid: u16, slot: u16, len: usize) {
        let Some(s) = self.exports[e].queue(qid).map(|q| q.slots[slot as usize]) else {
            return;
        };
        let Some(c) = self.conns[i].as_mut() else {
            return;
        };
        if let Some(stream) = c.tcp() {
            let neg = stream.neg;
            stream.tx.push(
                &Pdu::R2T {
                    cccid: s.sqe.cid.get(),
                    ttag: slot,
                    offset: 0,
                    length: len as u32,
                },
                &neg,
            );
            return;
        }
        #[cfg(feature = "rdma")]
        self.rdma_read_slot(i, e, qid, slot, len);
    }

    /// The host data of the write in `slot` of queue `qid` is all in: run it.
    #[cfg(feature = "rdma")]
    pub fn data_in(&mut self, e: usize, qid: u16, slot: u16) {
        let Some(q) = self.exports[e].queue_mut(qid) else {
            return;
        };
        let Some(s) = q.slots.get_mut(slot as usize) else {
            return;
        };
        if !s.awaiting_data {
            return;
        }
        s.awaiting_data = false;
        s.received = s.len;
        self.submit(e, qid, slot);
    }

    /// Place slot `slot`'s command in the controller's SQ `qid` and ring.
    pub fn submit(&mut self, e: usize, qid: u16, slot: u16) {
        let ex = &mut self.exports[e];
        let Some(q) = ex
            .assoc
            .as_mut()
            .and_then(|a| a.queues[qid as usize].as_mut())
        else {
            return;
        };
        let s = q.slots[slot as usize];
        let mut local = s.sqe;
        local.cid = slot.into();
        if s.len > 0 {
            ex.host.set_data(&mut local, qid, slot, s.len);
        } else if matches!(s.owner, Owner::Host { .. }) {
            // the host's SGL means nothing to the controller (the target's own queue
            // creation commands carry their ring address here)
            local.flags &= 0x3;
            local.prp1 = 0.into();
            local.prp2 = 0.into();
        }
        ex.host.push(qid, &local);
        ex.host.ring(qid);
        ex.spec.handle.wake();
    }

    /// An H2CData PDU: data for the write waiting in slot `ttag`.
    pub fn h2c_data(
        &mut self,
        i: usize,
        cccid: u16,
        ttag: u16,
        offset: u32,
        data: &[u8],
        last: bool,
    ) {
        let Some(&Role::Queue { export: e, qid }) = self.conns[i].as_ref().map(|c| &c.role) else {
            self.fatal(i, fes::PDU_SEQUENCE_ERROR, 0, "H2CData before Connect");
            return;
        };
        let Some(q) = self.exports[e].queue_mut(qid) else {
            return;
        };
        let Some(s) = q
            .slots
            .get(ttag as usize)
            .copied()
            .filter(|s| s.owner == Owner::Host { cid: cccid } && s.awaiting_data)
        else {
            self.fatal(
                i,
                fes::INVALID_HEADER_FIELD,
                10,
                "H2CData for no outstanding R2T",
            );
            return;
        };
        let off = offset as usize;
        if off != s.received {
            self.fatal(i, fes::DATA_OUT_OF_RANGE, 12, "H2CData out of order");
            return;
        }
        if off + data.len() > s.len {
            self.fatal(i, fes::DATA_OUT_OF_RANGE, 16, "H2CData beyond the R2T");
            return;
        }
        let done = off + data.len() == s.len;
        if done != last {
            self.fatal(
                i,
                fes::INVALID_HEADER_FIELD,
                1,
                "H2CData LAST_PDU flag wrong",
            );
            return;
        }
        q.slots[ttag as usize].received += data.len();
        if done {
            q.slots[ttag as usize].awaiting_data = false;
        }
        self.exports[e].host.write_slot(qid, ttag, off, data);
        if done {
            if s.digest_failed {
                self.finish_host_slot(e, qid, ttag, Status::TRANSIENT_TRANSPORT_ERROR);
            } else {
                self.submit(e, qid, ttag);
            }
        }
    }

    /// A data digest failed: the command fails with Transient Transport Error, for H2C data
    /// once all of its data is in (the bad PDU still counts, its bytes unused).
    pub fn data_digest_error(&mut self, i: usize, f: &crate::pdu::DigestFailure) {
        if f.pdu_type != nvme_spec::tcp::pdu_type::H2C_DATA {
            self.respond(i, f.cccid, Status::TRANSIENT_TRANSPORT_ERROR, 0);
            return;
        }
        if let Some(&Role::Queue { export: e, qid }) = self.conns[i].as_ref().map(|c| &c.role)
            && let Some(q) = self.exports[e].queue_mut(qid)
            && let Some(s) = q
                .slots
                .get_mut(f.ttag as usize)
                .filter(|s| s.owner == Owner::Host { cid: f.cccid } && s.awaiting_data)
        {
            s.digest_failed = true;
        }
        // the same checks and accounting as good data (a bad ttag or offset is fatal)
        let mut zeros = std::mem::take(&mut self.scratch);
        zeros.clear();
        zeros.resize(f.length as usize, 0);
        self.h2c_data(i, f.cccid, f.ttag, f.offset, &zeros, f.last);
        self.scratch = zeros;
    }

    /// Answer command `cid` on connection `i` with a response capsule.
    pub fn respond(&mut self, i: usize, cid: u16, status: Status, result: u64) {
        let Some(c) = self.conns[i].as_mut() else {
            return;
        };
        let mut cqe = Completion::default();
        cqe.dw0 = (result as u32).into();
        cqe.dw1 = ((result >> 32) as u32).into();
        cqe.cid = cid.into();
        cqe.status = status.cqe_bits().into();
        c.respond(&cqe);
    }
}
