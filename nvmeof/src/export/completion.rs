//! Completions from the exported controllers: a host command's data goes back in a
//! C2HData PDU, then its response capsule; the target's own Create I/O CQ/SQ commands move
//! an I/O queue's Connect along.

use nvme_spec::opcode::admin as op;
use nvme_spec::{Completion, Status, Submission};

use super::connection::Role;
use super::event_loop::Target;
use super::{Owner, Slot};

impl Target {
    /// Collect export `e`'s completions; returns how many.
    pub fn reap(&mut self, e: usize) -> usize {
        let Some(nq) = self.exports[e].assoc.as_ref().map(|a| a.queues.len()) else {
            return 0;
        };
        let mut cqes: Vec<(u16, Completion)> = Vec::new();
        for qid in 0..nq as u16 {
            let ex = &mut self.exports[e];
            let live = ex
                .assoc
                .as_ref()
                .is_some_and(|a| a.queues[qid as usize].as_ref().is_some_and(|q| q.live));
            if live {
                ex.host.reap(qid, &mut |c| cqes.push((qid, c)));
            }
        }
        let n = cqes.len();
        for (qid, cqe) in cqes {
            self.completed(e, qid, &cqe);
        }
        if n > 0 {
            // one send per connection for the whole batch; errors show on the next read
            for c in self.conns.iter_mut().flatten() {
                if c.pending() > 0 {
                    let _ = c.flush();
                }
            }
        }
        n
    }

    fn completed(&mut self, e: usize, qid: u16, cqe: &Completion) {
        let slot = cqe.cid.get();
        let Some(q) = self.exports[e].queue_mut(qid) else {
            return;
        };
        let Some(s) = q.slots.get(slot as usize).copied() else {
            device_model::warn_limited!(
                "nvme-tcp target: completion for slot {slot} the target never used"
            );
            return;
        };
        let status = Status::from_cqe_bits(cqe.status.get());
        match s.owner {
            Owner::Free | Owner::Sending => {
                device_model::warn_limited!("nvme-tcp target: completion for free slot {slot}");
            }
            Owner::Host { cid } => {
                let conn = q.conn;
                let mut resp = *cqe;
                resp.cid = cid.into();
                let mut held = false;
                #[cfg(feature = "rdma")]
                let region = conn.and_then(|i| self.rdma_slot_region(i, e));
                // the slot's buffer goes straight to the host (TCP: into the send buffer;
                // RDMA: written from the buffer by the adapter, so the slot stays taken
                // until the response has gone)
                let Target { exports, conns, .. } = self;
                if let Some(c) = conn.and_then(|i| conns[i].as_mut()) {
                    if s.to_host && status.is_success() && s.len > 0 {
                        held = c.send_slot_data_and_respond(
                            &s.sqe,
                            &resp,
                            &exports[e].host,
                            qid,
                            slot,
                            s.len,
                            #[cfg(feature = "rdma")]
                            region.as_deref(),
                        );
                    } else {
                        c.respond_to(&s.sqe, &resp);
                    }
                }
                if held {
                    self.hold_slot(e, qid, slot, cid);
                } else {
                    self.free_slot(e, qid, slot, Some(cid));
                }
            }
            Owner::CreateCq { conn, qid: ioq } => {
                if status.is_success() {
                    let size = self.io_queue_size(e, ioq);
                    let mut create = Submission::default();
                    create.opcode = op::CREATE_IO_SQ;
                    create.prp1 = self.exports[e].host.ring_iovas(ioq).0.into();
                    create.cdw10 = (u32::from(ioq) | ((size - 1) << 16)).into();
                    create.cdw11 = (1 | (u32::from(ioq) << 16)).into();
                    if let Some(q) = self.exports[e].queue_mut(0) {
                        q.slots[slot as usize] = Slot {
                            owner: Owner::CreateSq { conn, qid: ioq },
                            sqe: create,
                            ..Slot::default()
                        };
                    }
                    self.submit(e, 0, slot);
                } else {
                    self.free_slot(e, 0, slot, None);
                    self.connect_done(e, conn, ioq, status);
                }
            }
            Owner::CreateSq { conn, qid: ioq } => {
                self.free_slot(e, 0, slot, None);
                self.connect_done(e, conn, ioq, status);
            }
        }
    }

    fn io_queue_size(&self, e: usize, qid: u16) -> u32 {
        self.exports[e]
            .queue(qid)
            .map_or(2, |q| q.slots.len() as u32 + 1)
    }

    /// The command in `slot` is answered but its buffer is still being sent: the host's
    /// CID is free, the slot not yet (until [`free_slot`](Self::free_slot)).
    fn hold_slot(&mut self, e: usize, qid: u16, slot: u16, cid: u16) {
        if let Some(q) = self.exports[e].queue_mut(qid) {
            q.slots[slot as usize] = Slot {
                owner: Owner::Sending,
                ..Slot::default()
            };
            q.set_cid(cid, false);
        }
    }

    /// Slot `slot` of queue `qid` is free again (and the host's CID with it).
    pub(super) fn free_slot(&mut self, e: usize, qid: u16, slot: u16, cid: Option<u16>) {
        if let Some(q) = self.exports[e].queue_mut(qid) {
            q.slots[slot as usize] = Slot::default();
            q.free.push(slot);
            if let Some(c) = cid {
                q.set_cid(c, false);
            }
        }
    }

    /// Complete a host command in `slot` without running it (its data failed a digest).
    pub fn finish_host_slot(&mut self, e: usize, qid: u16, slot: u16, status: Status) {
        let Some(q) = self.exports[e].queue(qid) else {
            return;
        };
        let (conn, owner) = (q.conn, q.slots[slot as usize].owner);
        let Owner::Host { cid } = owner else {
            return;
        };
        if let Some(i) = conn {
            self.respond(i, cid, status, 0);
        }
        self.free_slot(e, qid, slot, Some(cid));
    }

    /// The controller created (or refused) I/O queue `qid` for connection `conn`: answer
    /// its Connect.
    fn connect_done(&mut self, e: usize, conn: usize, qid: u16, status: Status) {
        let cntlid = self.exports[e].spec.cntlid;
        let Some(q) = self.exports[e].queue_mut(qid) else {
            return;
        };
        let cid = q.connect_cid;
        if status.is_success() {
            q.live = true;
            if let Some(c) = self.conns[conn].as_mut() {
                c.role = Role::Queue { export: e, qid };
            }
            self.respond(conn, cid, Status::SUCCESS, u64::from(cntlid));
        } else {
            device_model::warn_limited!(
                "nvme-tcp target: creating I/O queue {qid} failed: {status:?}"
            );
            if let Some(a) = self.exports[e].assoc.as_mut() {
                a.queues[qid as usize] = None;
            }
            if let Some(c) = self.conns[conn].as_mut() {
                c.role = Role::AwaitingConnect;
            }
            self.respond(conn, cid, status, 0);
        }
        if let Some(c) = self.conns[conn].as_mut() {
            let _ = c.flush();
        }
    }
}
