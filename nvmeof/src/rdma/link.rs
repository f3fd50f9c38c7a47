//! One RDMA connection of the target: its queue pair, completion queue, receive buffers for
//! command capsules, and a staging buffer for the few transfers that do not go to a command
//! slot (a Connect's data, a discovery log page). Work requests are tagged so a completion
//! says what finished; the target's fabrics layer acts on the [`LinkEvent`]s.

use std::collections::VecDeque;
use std::sync::Arc;

use nvme_spec::Submission;

use super::cm_records::ConnectRequest;
use super::verbs::{CmId, CompletionQueue, ProtectionDomain, Region, VerbsError, WorkCompletion};
use super::verbs::{consts, wc_status_text};

/// Bytes of the staging buffer that take a Fabrics command's data from the host.
pub const STAGE_IN: usize = 4096;
/// Bytes of the staging buffer for data to the host that has no command slot.
pub const STAGE_OUT: usize = 60 * 1024;
/// Most RDMA Reads one connection has outstanding (ORD), whatever the host allows.
const MAX_READS: u8 = 16;

/// Work request tags (bits 56..63 of the id; the low bits carry a buffer or slot).
mod tag {
    pub const RECV: u64 = 1;
    pub const SLOT_READ: u64 = 2;
    pub const STAGE_READ: u64 = 3;
    pub const SLOT_SENT: u64 = 4;
    pub const SEND: u64 = 5;
    pub const WRITE: u64 = 6;
}

fn wr_id(tag: u64, low: u64) -> u64 {
    (tag << 56) | low
}

/// What a connection's completions mean to the target.
#[derive(Debug, Clone, Copy)]
pub enum LinkEvent {
    /// A command capsule of `len` bytes arrived in receive buffer `buf`.
    Capsule { buf: u16, len: usize },
    /// The host data of the command in `slot` is in its slot buffer.
    SlotData { slot: u16 },
    /// The host data of Fabrics command `sqe` (`len` bytes) is in the staging buffer.
    FabricsData { sqe: Submission, len: usize },
    /// The response of the command in `slot` (and its data before it) went out: the slot
    /// buffer may be reused.
    SlotSent { slot: u16 },
}

/// An RDMA Read waiting for the connection's read budget.
#[derive(Debug, Clone, Copy)]
struct QueuedRead {
    slot: u16,
    offset: usize,
    len: usize,
    remote: u64,
    key: u32,
}

/// A target connection.
pub struct RdmaLink {
    id: CmId,
    cq: Arc<CompletionQueue>,
    recv: Region,
    capsule: usize,
    stage: Region,
    pub request: ConnectRequest,
    /// RDMA Reads in flight, and the most allowed (negotiated at accept).
    reads: u8,
    max_reads: u8,
    queued: VecDeque<QueuedRead>,
    /// A Fabrics command whose data is being read into the staging buffer.
    fabrics: Option<Submission>,
    /// The exported controller's command buffers, registered on this connection's device
    /// (once the connection is a queue of an association).
    slot_region: Option<Arc<Region>>,
    wcs: Vec<WorkCompletion>,
    failed: Option<String>,
    peer: String,
}

impl std::fmt::Debug for RdmaLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaLink")
            .field("peer", &self.peer)
            .field("qid", &self.request.qid)
            .finish_non_exhaustive()
    }
}

impl RdmaLink {
    /// Set up the queue pair of a connect request on `id` and accept it. `capsule` is the
    /// largest command capsule (64 bytes + in-capsule data); `host_depth` the host's
    /// responder resources (RDMA Reads it serves at once).
    pub fn accept(
        mut id: CmId,
        pd: &Arc<ProtectionDomain>,
        request: ConnectRequest,
        capsule: usize,
        host_reads: u8,
        host_initiator_depth: u8,
        peer: String,
    ) -> Result<Self, VerbsError> {
        let device = pd.device();
        // capsules the host may send at once: its send queue (plus one spare)
        let recv_n = u32::from(request.hsqsize) + 2;
        let send_n = 2 * u32::from(request.hsqsize + 1) + 8;
        let cq = Arc::new(CompletionQueue::new(device, (recv_n + send_n) as i32)?);
        id.create_qp(pd, &cq, send_n, recv_n, 64)?;
        let recv = Region::anonymous(pd, recv_n as usize * capsule)?;
        let stage = Region::anonymous(pd, STAGE_IN + STAGE_OUT)?;
        let max_reads = host_reads.clamp(1, MAX_READS);
        let link = Self {
            id,
            cq,
            recv,
            capsule,
            stage,
            request,
            reads: 0,
            max_reads,
            queued: VecDeque::new(),
            fabrics: None,
            slot_region: None,
            wcs: vec![WorkCompletion::default(); 64],
            failed: None,
            peer,
        };
        {
            let qp = link.id.qp().ok_or(VerbsError::OutOfRange("queue pair"))?;
            for b in 0..recv_n as usize {
                qp.post_recv(wr_id(tag::RECV, b as u64), &link.recv, b * capsule, capsule)?;
            }
        }
        let record = super::cm_records::accept_record(request.hsqsize + 1);
        link.id
            .accept(&record, host_initiator_depth.min(MAX_READS), max_reads)?;
        Ok(link)
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The device the connection runs on.
    pub fn device(&self) -> Option<super::verbs::Device> {
        self.id.device()
    }

    /// How CM events name this connection.
    pub fn cm_id(&self) -> super::verbs::RawCmId {
        self.id.raw()
    }

    /// Why the connection failed (an error completion or a refused post), if it did.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            self.failed = Some(why);
        }
    }

    /// The completion channel descriptor, armed (call after a pass found no work).
    pub fn arm(&mut self) -> Option<i32> {
        match self.cq.arm() {
            Ok(_) => Some(self.cq.fd()),
            Err(e) => {
                self.fail(e.to_string());
                None
            }
        }
    }

    /// The completion channel's descriptor.
    pub fn fd(&self) -> i32 {
        self.cq.fd()
    }

    /// Collect completions into `out`; returns how many completions there were.
    pub fn poll(&mut self, out: &mut Vec<LinkEvent>) -> usize {
        self.cq.drain_events();
        let mut wcs = std::mem::take(&mut self.wcs);
        let n = match self.cq.poll(&mut wcs) {
            Ok(n) => n,
            Err(e) => {
                self.fail(e.to_string());
                0
            }
        };
        for wc in &wcs[..n] {
            self.completion(wc, out);
        }
        self.wcs = wcs;
        n
    }

    fn completion(&mut self, wc: &WorkCompletion, out: &mut Vec<LinkEvent>) {
        let (t, low) = (wc.wr_id >> 56, wc.wr_id & ((1 << 56) - 1));
        if wc.status != consts::WC_SUCCESS {
            self.fail(format!(
                "{} (work request {t}/{low}, vendor error {:#x})",
                wc_status_text(wc.status),
                wc.vendor_err
            ));
            return;
        }
        match t {
            tag::RECV => out.push(LinkEvent::Capsule {
                buf: low as u16,
                len: wc.byte_len as usize,
            }),
            tag::SLOT_READ => {
                self.reads = self.reads.saturating_sub(1);
                out.push(LinkEvent::SlotData { slot: low as u16 });
                self.start_queued();
            }
            tag::STAGE_READ => {
                self.reads = self.reads.saturating_sub(1);
                if let Some(sqe) = self.fabrics.take() {
                    out.push(LinkEvent::FabricsData {
                        sqe,
                        len: low as usize,
                    });
                }
                self.start_queued();
            }
            tag::SLOT_SENT => out.push(LinkEvent::SlotSent { slot: low as u16 }),
            _ => {}
        }
    }

    /// Copy the capsule in receive buffer `buf` (`len` bytes) into `out` and give the
    /// buffer back to the adapter. False when `len` is not a capsule (too short or long).
    pub fn take_capsule(&mut self, buf: u16, len: usize, out: &mut Vec<u8>) -> bool {
        let b = buf as usize;
        if b * self.capsule >= self.recv.len() {
            self.fail(format!("receive completion for buffer {b} we never posted"));
            return false;
        }
        let ok = (64..=self.capsule).contains(&len);
        if ok {
            out.clear();
            out.resize(len, 0);
            if let Err(e) = self.recv.read(b * self.capsule, out) {
                self.fail(e.to_string());
                return false;
            }
        }
        let posted = self.id.qp().map(|qp| {
            qp.post_recv(
                wr_id(tag::RECV, b as u64),
                &self.recv,
                b * self.capsule,
                self.capsule,
            )
        });
        match posted {
            Some(Ok(())) => {}
            Some(Err(e)) => self.fail(e.to_string()),
            None => self.fail("no queue pair".into()),
        }
        ok
    }

    /// Send a response capsule (a 16-byte completion), copied into the request.
    pub fn respond(&mut self, cqe: &[u8], invalidate: Option<u32>) {
        let r = match (self.id.qp(), invalidate) {
            (Some(qp), None) => qp.send_inline(wr_id(tag::SEND, 0), cqe, true),
            (Some(qp), Some(key)) => {
                qp.send_inline_invalidating(wr_id(tag::SEND, 0), cqe, key, true)
            }
            (None, _) => Err(VerbsError::OutOfRange("queue pair")),
        };
        if let Err(e) = r {
            self.fail(e.to_string());
        }
    }

    /// Write `len` bytes of `region` at `offset` to the host's keyed buffer, then send the
    /// response `cqe` (invalidating the key when `invalidate`); [`LinkEvent::SlotSent`] for
    /// `slot` says both are done.
    #[allow(clippy::too_many_arguments)]
    pub fn write_then_respond(
        &mut self,
        region: &Region,
        offset: usize,
        len: usize,
        (remote, key): (u64, u32),
        cqe: &[u8],
        slot: u16,
        invalidate: bool,
    ) {
        let r = match self.id.qp() {
            Some(qp) => qp
                .write(
                    wr_id(tag::WRITE, 0),
                    region,
                    (offset, len),
                    (remote, key),
                    false,
                )
                .and_then(|()| {
                    let id = wr_id(tag::SLOT_SENT, slot.into());
                    if invalidate {
                        qp.send_inline_invalidating(id, cqe, key, true)
                    } else {
                        qp.send_inline(id, cqe, true)
                    }
                }),
            None => Err(VerbsError::OutOfRange("queue pair")),
        };
        if let Err(e) = r {
            self.fail(e.to_string());
        }
    }

    /// Write `data` (up to [`STAGE_OUT`] bytes) to the host's keyed buffer through the
    /// staging buffer. Returns the bytes written.
    pub fn write_staged(&mut self, data: &[u8], remote: u64, key: u32) -> usize {
        let n = data.len().min(STAGE_OUT);
        let r = self.stage.write(STAGE_IN, &data[..n]).and_then(|()| {
            self.id
                .qp()
                .ok_or(VerbsError::OutOfRange("queue pair"))?
                .write(
                    wr_id(tag::WRITE, 0),
                    &self.stage,
                    (STAGE_IN, n),
                    (remote, key),
                    false,
                )
        });
        if let Err(e) = r {
            self.fail(e.to_string());
        }
        n
    }

    /// Read the host data of Fabrics command `sqe` (`len` bytes, at most [`STAGE_IN`]) into
    /// the staging buffer. False when one is already being read.
    pub fn read_fabrics_data(
        &mut self,
        sqe: Submission,
        remote: u64,
        len: usize,
        key: u32,
    ) -> bool {
        if self.fabrics.is_some() || len > STAGE_IN {
            return false;
        }
        self.fabrics = Some(sqe);
        self.queued.push_back(QueuedRead {
            slot: u16::MAX,
            offset: 0,
            len,
            remote,
            key,
        });
        self.start_queued();
        true
    }

    /// Read the host data of the command in `slot` into `region` at `offset`.
    pub fn read_slot_data(
        &mut self,
        slot: u16,
        offset: usize,
        len: usize,
        remote: u64,
        key: u32,
        region: Arc<Region>,
    ) {
        self.slot_region = Some(region);
        self.queued.push_back(QueuedRead {
            slot,
            offset,
            len,
            remote,
            key,
        });
        self.start_queued();
    }

    fn start_queued(&mut self) {
        while self.reads < self.max_reads {
            let Some(r) = self.queued.pop_front() else {
                return;
            };
            let res = match (self.id.qp(), r.slot) {
                (None, _) => Err(VerbsError::OutOfRange("queue pair")),
                (Some(qp), u16::MAX) => qp.read(
                    wr_id(tag::STAGE_READ, r.len as u64),
                    &self.stage,
                    (0, r.len),
                    (r.remote, r.key),
                ),
                (Some(qp), slot) => match &self.slot_region {
                    Some(region) => qp.read(
                        wr_id(tag::SLOT_READ, slot.into()),
                        region,
                        (r.offset, r.len),
                        (r.remote, r.key),
                    ),
                    None => Err(VerbsError::OutOfRange("slot memory")),
                },
            };
            match res {
                Ok(()) => self.reads += 1,
                Err(e) => {
                    self.fail(e.to_string());
                    return;
                }
            }
        }
    }

    /// Copy the first `out.len()` bytes of staged host data out.
    pub fn staged(&self, out: &mut [u8]) -> bool {
        self.stage.read(0, out).is_ok()
    }

    /// Disconnect (the peer sees the connection end; the id and queue pair go on drop).
    pub fn disconnect(&self) {
        self.id.disconnect();
    }
}
