//! The target's RDMA queues: RDMA CM events (new connections, disconnects) and each
//! connection's completions, turned into the fabrics layer's steps: a capsule into
//! [`Target::capsule`] as over TCP, host data read into a command's slot into
//! [`Target::data_in`], a sent response into the slot's release.

use std::sync::Arc;

use nvme_spec::fabrics;

use crate::rdma::link::LinkEvent;
use crate::rdma::port::PortEvent;
use crate::rdma::sgl::{self, DataPointer};
use crate::rdma::verbs::Region;

use super::connection::{Conn, Link, Role};
use super::event_loop::{MAX_CONNECTIONS, Target};
use super::{INLINE_DATA, Owner, QUEUE_DEPTH};

impl Target {
    /// Take RDMA CM events and every RDMA connection's completions; returns the work done.
    pub fn poll_rdma(&mut self) -> usize {
        let mut work = self.rdma_cm_events();
        let mut events = std::mem::take(&mut self.rdma_events);
        for i in 0..self.conns.len() {
            let Some(Conn {
                link: Link::Rdma(l),
                ..
            }) = self.conns[i].as_mut()
            else {
                continue;
            };
            events.clear();
            let mut n = l.poll(&mut events);
            if n == 0 && l.arm().is_some() {
                // armed for the idle reactor's sleep; what arrived before arming is seen now
                n = l.poll(&mut events);
            }
            work += n;
            for ev in events.drain(..) {
                self.contained(i, None, |t| {
                    t.rdma_event(i, ev);
                    1
                });
            }
            let failed = match self.conns[i].as_ref().map(|c| &c.link) {
                Some(Link::Rdma(l)) => l.failed().map(str::to_string),
                _ => None,
            };
            if let Some(why) = failed {
                device_model::warn_limited!("nvme-rdma target: connection failed: {why}");
                self.close(i, &why);
            }
        }
        self.rdma_events = events;
        work
    }

    fn rdma_cm_events(&mut self) -> usize {
        let max_qid = self
            .exports
            .iter()
            .map(|e| e.spec.io_queues)
            .max()
            .unwrap_or(0);
        let mut work = 0;
        loop {
            let Some(port) = self.rdma.as_mut() else {
                return work;
            };
            let ev = match port.next_event(QUEUE_DEPTH as u16, max_qid, 64 + INLINE_DATA) {
                Ok(None) => return work,
                Ok(Some(ev)) => ev,
                Err(e) => {
                    device_model::warn_limited!("nvme-rdma target: connection manager: {e}");
                    return work;
                }
            };
            work += 1;
            match ev {
                None => {}
                Some(PortEvent::Connected { link, port }) => {
                    if self.conns.iter().flatten().count() >= MAX_CONNECTIONS {
                        device_model::warn_limited!(
                            "nvme-rdma target: {MAX_CONNECTIONS} connections already; refused"
                        );
                        link.disconnect();
                        continue;
                    }
                    let local = self
                        .rdma
                        .as_ref()
                        .and_then(|r| r.addrs().get(port).copied())
                        .unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
                    log::debug!(
                        "nvme-rdma target: connection on {local} (queue {})",
                        link.request.qid
                    );
                    // no ICReq over RDMA: RDMA CM set the queue up
                    self.add_conn(Link::Rdma(link), Role::AwaitingConnect, local);
                }
                Some(PortEvent::Ended(id)) => {
                    let i = self.conns.iter().position(
                        |c| matches!(c, Some(Conn { link: Link::Rdma(l), .. }) if l.cm_id() == id),
                    );
                    if let Some(i) = i {
                        self.host_closed(i);
                    }
                }
            }
        }
    }

    fn rdma_event(&mut self, i: usize, ev: LinkEvent) {
        match ev {
            LinkEvent::Capsule { buf, len } => self.rdma_capsule(i, buf, len),
            LinkEvent::FabricsData { mut sqe, len } => {
                let mut data = std::mem::take(&mut self.scratch);
                data.clear();
                data.resize(len, 0);
                let ok = match self.conns[i].as_ref().map(|c| &c.link) {
                    Some(Link::Rdma(l)) => l.staged(&mut data),
                    _ => false,
                };
                if ok {
                    // the command goes on as one that carried its data in the capsule
                    sgl::set_in_capsule(&mut sqe, len);
                    self.capsule(i, sqe, &data);
                }
                self.scratch = data;
            }
            LinkEvent::SlotData { slot } => {
                if let Some(&Role::Queue { export, qid }) = self.conns[i].as_ref().map(|c| &c.role)
                {
                    self.data_in(export, qid, slot);
                }
            }
            LinkEvent::SlotSent { slot } => {
                if let Some(&Role::Queue { export, qid }) = self.conns[i].as_ref().map(|c| &c.role)
                    && self.exports[export]
                        .queue(qid)
                        .and_then(|q| q.slots.get(slot as usize))
                        .is_some_and(|s| s.owner == Owner::Sending)
                {
                    self.free_slot(export, qid, slot, None);
                }
            }
        }
    }

    /// A command capsule in receive buffer `buf`: checked, then handled as over TCP, except
    /// that a Fabrics command's host data named by a keyed SGL is read first.
    fn rdma_capsule(&mut self, i: usize, buf: u16, len: usize) {
        let mut data = std::mem::take(&mut self.scratch);
        let ok = match self.conns[i].as_mut().map(|c| &mut c.link) {
            Some(Link::Rdma(l)) => l.take_capsule(buf, len, &mut data),
            _ => false,
        };
        if !ok {
            self.scratch = data;
            self.fatal(i, 0, 0, &format!("malformed command capsule ({len} bytes)"));
            return;
        }
        let Some((sqe, inline)) = sgl::split_capsule(&data, 64 + INLINE_DATA) else {
            self.scratch = data;
            self.fatal(i, 0, 0, &format!("malformed command capsule ({len} bytes)"));
            return;
        };
        // Fabrics commands move data host to controller by fctype bits 1:0 = 01b (Connect)
        let fabrics_in = sqe.opcode == fabrics::OPCODE && sqe.nsid.get() as u8 & 3 == 1;
        if fabrics_in
            && let Ok(DataPointer::Keyed { addr, len, key }) = sgl::data_pointer(&sqe, inline.len())
        {
            let started = match self.conns[i].as_mut().map(|c| &mut c.link) {
                Some(Link::Rdma(l)) => l.read_fabrics_data(sqe, addr, len, key),
                _ => false,
            };
            if !started {
                self.respond(
                    i,
                    sqe.cid.get(),
                    nvme_spec::Status::DATA_SGL_LENGTH_INVALID,
                    0,
                );
            }
        } else {
            self.capsule(i, sqe, inline);
        }
        self.scratch = data;
    }

    /// Export `e`'s command buffers, registered on connection `i`'s device.
    pub fn rdma_slot_region(&mut self, i: usize, e: usize) -> Option<Arc<Region>> {
        let Some(Conn {
            link: Link::Rdma(l),
            ..
        }) = self.conns[i].as_ref()
        else {
            return None;
        };
        let device = l.device()?;
        let host = &self.exports[e].host;
        match self
            .rdma
            .as_mut()?
            .slot_region(device, e, host.memory_fd(), host.memory_len())
        {
            Ok(r) => Some(r),
            Err(err) => {
                device_model::warn_limited!(
                    "nvme-rdma target: registering {}'s buffers: {err}",
                    self.exports[e].spec.nqn
                );
                None
            }
        }
    }

    /// Read the host data of the write in `slot` (queue `qid` of export `e`) into the slot's
    /// buffer with RDMA Read; [`LinkEvent::SlotData`] says when it is in.
    pub fn rdma_read_slot(&mut self, i: usize, e: usize, qid: u16, slot: u16, len: usize) {
        let Some(sqe) = self.exports[e]
            .queue(qid)
            .map(|q| q.slots[slot as usize].sqe)
        else {
            return;
        };
        let region = self.rdma_slot_region(i, e);
        let offset = self.exports[e].host.slot_offset(qid, slot);
        let Some(Conn {
            link: Link::Rdma(l),
            ..
        }) = self.conns[i].as_mut()
        else {
            return;
        };
        let (addr, _, key) = sgl::keyed(&sqe);
        match region {
            Some(r) => l.read_slot_data(slot, offset, len, addr, key, r),
            None => self.close(i, "no registered memory for the controller's buffers"),
        }
    }
}
