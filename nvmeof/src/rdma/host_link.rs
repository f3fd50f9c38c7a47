//! One host-side NVMe/RDMA queue's transport: an RDMA CM connection (address and route
//! resolved, queue pair, connect request naming the queue, §3.2), a registered capsule
//! buffer and a registered data buffer per command slot, and receive buffers for response
//! capsules. The queue above (`initiator::queue`) keeps the commands; this moves them.
//!
//! Data goes through the slot's registered buffer: a write's data is copied there and the
//! command names it with a Keyed SGL Data Block (or carries it in the capsule when small and
//! the controller takes in-capsule data); a read's data is written there by the target with
//! RDMA Write before its response arrives (reliable connection ordering) and copied to the
//! guest's buffers then. Not zero copy: registering guest memory for remote access would let
//! the target reach all of it; the way to zero copy is a type 2 memory window bound over
//! each command's buffers (and invalidated by the target's Send with Invalidate, or by us,
//! before the command completes), which Soft-RoCE in Linux 6.12 does not run reliably.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_model::backend::GuestBuffers;
use nvme_spec::fabrics::sgl_id;
use nvme_spec::{Completion, Submission};
use zerocopy::{FromBytes, IntoBytes};

use super::cm_records::{ConnectRequest, parse_reject};
use super::verbs::{
    self, CmEventKind, CmId, CompletionQueue, EventChannel, ProtectionDomain, Region, VerbsError,
    WorkCompletion, consts, wc_status_text,
};

/// Bytes one command may move (each slot has a registered buffer of this size).
pub const SLOT_BYTES: usize = 128 * 1024;
/// Largest command capsule we send: the command and up to 8 KiB of in-capsule data.
const CAPSULE_BYTES: usize = 64 + 8192;
/// A response capsule: one completion.
const RESPONSE_BYTES: usize = 16;

const TAG_RECV: u64 = 1 << 56;
const TAG_SEND: u64 = 2 << 56;

/// Why an RDMA queue failed.
#[derive(Debug, thiserror::Error)]
pub enum HostLinkError {
    #[error(transparent)]
    Verbs(#[from] VerbsError),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error(
        "the target refused the connection (RDMA CM event {kind:?}, NVMe/RDMA status {status:?})"
    )]
    Refused {
        kind: CmEventKind,
        status: Option<u16>,
    },
    #[error("connection failed: {0}")]
    Failed(String),
    #[error("a response for command {0}, which is not in flight")]
    UnknownResponse(u16),
    #[error("a {0}-byte message where a response capsule (16 bytes) belongs")]
    BadResponse(usize),
    #[error("{0} bytes do not fit a command slot ({SLOT_BYTES} bytes)")]
    TooLong(usize),
}

/// The transport of one host queue.
pub struct RdmaHostLink {
    // the id (with its queue pair) goes first: no transfer touches the buffers after it
    id: CmId,
    cq: Arc<CompletionQueue>,
    send: Region,
    recv: Region,
    data: Region,
    _channel: EventChannel,
    slots: usize,
    recv_n: usize,
    wcs: Vec<WorkCompletion>,
    /// A write's data on its way to the slot buffer, a read's on its way out (reused).
    scratch: Vec<u8>,
    failed: Option<String>,
    peer: String,
}

impl std::fmt::Debug for RdmaHostLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaHostLink")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// Wait for the next CM event on `ch` until `deadline`.
fn next_event(
    ch: &EventChannel,
    deadline: Instant,
    what: &'static str,
) -> Result<verbs::CmEvent, HostLinkError> {
    loop {
        if let Some(ev) = ch.next()? {
            return Ok(ev);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HostLinkError::Timeout(what));
        }
        let mut fds = [sys_util::poll::PollFd {
            fd: ch.fd(),
            events: sys_util::poll::POLLIN,
            revents: 0,
        }];
        let _ = sys_util::poll::poll(&mut fds, left.min(Duration::from_millis(100)));
    }
}

/// Wait for CM event `want` (any other is a refusal).
fn expect(
    ch: &EventChannel,
    want: CmEventKind,
    deadline: Instant,
    what: &'static str,
) -> Result<(), HostLinkError> {
    let ev = next_event(ch, deadline, what)?;
    if ev.kind == want {
        return Ok(());
    }
    Err(HostLinkError::Refused {
        kind: ev.kind,
        status: parse_reject(&ev.private_data),
    })
}

impl RdmaHostLink {
    /// Connect queue `qid` of `entries` entries to the target at `addr`.
    pub fn connect(
        addr: SocketAddr,
        qid: u16,
        entries: u16,
        timeout: Duration,
    ) -> Result<Self, HostLinkError> {
        verbs::probe()?;
        let deadline = Instant::now() + timeout;
        let ms = timeout.as_millis().min(60_000) as i32;
        let channel = EventChannel::new()?;
        let mut id = CmId::new(&channel)?;
        id.resolve_addr(addr, ms)?;
        expect(
            &channel,
            CmEventKind::AddrResolved,
            deadline,
            "address resolution",
        )?;
        id.resolve_route(ms)?;
        expect(
            &channel,
            CmEventKind::RouteResolved,
            deadline,
            "route resolution",
        )?;
        let device = id.device().ok_or(VerbsError::NoDevice)?;
        let pd = Arc::new(ProtectionDomain::new(device)?);
        let slots = usize::from(entries.max(2) - 1);
        // responses: one per command, plus spares for a target that answers early
        let recv_n = slots + 2;
        let send_n = slots + 4;
        let cq = Arc::new(CompletionQueue::new(device, (recv_n + send_n) as i32)?);
        id.create_qp(&pd, &cq, send_n as u32, recv_n as u32, 64)?;
        let send = Region::anonymous(&pd, slots * CAPSULE_BYTES)?;
        let recv = Region::anonymous(&pd, recv_n * RESPONSE_BYTES)?;
        let data = Region::anonymous(&pd, slots * SLOT_BYTES)?;
        {
            let qp = id.qp().ok_or(VerbsError::OutOfRange("queue pair"))?;
            for b in 0..recv_n {
                qp.post_recv(
                    TAG_RECV | b as u64,
                    &recv,
                    b * RESPONSE_BYTES,
                    RESPONSE_BYTES,
                )?;
            }
        }
        let request = ConnectRequest {
            qid,
            hrqsize: entries,
            hsqsize: entries - 1,
        };
        id.connect(&request.encode(), 16, 16)?;
        expect(&channel, CmEventKind::Established, deadline, "connection")?;
        Ok(Self {
            id,
            cq,
            send,
            recv,
            data,
            _channel: channel,
            slots,
            recv_n,
            wcs: vec![WorkCompletion::default(); 32],
            scratch: Vec::new(),
            failed: None,
            peer: format!("rdma:{addr}"),
        })
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Send command `sqe` (its CID is its slot) moving `len` bytes: `inline` ones (host to
    /// controller, from `write`) in the capsule, else through the slot's data buffer (a
    /// write's data copied there from `write` first). A failure fails the link (the next
    /// [`poll`](Self::poll) says so, with the command in flight).
    pub fn submit(
        &mut self,
        sqe: Submission,
        len: usize,
        inline: bool,
        write: Option<GuestBuffers<'_>>,
    ) {
        if self.failed.is_some() {
            return;
        }
        if let Err(e) = self.try_submit(sqe, len, inline, write) {
            self.failed = Some(e.to_string());
        }
    }

    fn try_submit(
        &mut self,
        mut sqe: Submission,
        len: usize,
        inline: bool,
        write: Option<GuestBuffers<'_>>,
    ) -> Result<(), HostLinkError> {
        let slot = usize::from(sqe.cid.get());
        if slot >= self.slots {
            return Err(HostLinkError::Failed(format!("no slot {slot}")));
        }
        if len > SLOT_BYTES {
            return Err(HostLinkError::TooLong(len));
        }
        sqe.flags = (sqe.flags & 0x3) | nvme_spec::fabrics::PSDT_SGL;
        let off = slot * CAPSULE_BYTES;
        let mut sent = 64;
        self.scratch.clear();
        if let Some(w) = write.filter(|_| len > 0) {
            self.scratch.resize(len, 0);
            w.read_at(0, &mut self.scratch);
        }
        if inline && len > 0 && len <= CAPSULE_BYTES - 64 {
            sqe.prp1 = 0.into();
            sqe.prp2 = (len as u64 | (u64::from(sgl_id::INCAPSULE) << 56)).into();
            self.send.write(off + 64, &self.scratch)?;
            sent += len;
        } else {
            let at = slot * SLOT_BYTES;
            if !self.scratch.is_empty() {
                self.data.write(at, &self.scratch)?;
            }
            let (addr, key) = if len > 0 {
                (self.data.remote_addr(at), self.data.rkey())
            } else {
                (0, 0)
            };
            sqe.prp1 = addr.into();
            sqe.prp2 = ((len as u64 & 0xff_ffff)
                | (u64::from(key) << 24)
                | (u64::from(sgl_id::KEYED) << 56))
                .into();
        }
        self.send.write(off, sqe.as_bytes())?;
        let qp = self.id.qp().ok_or(VerbsError::OutOfRange("queue pair"))?;
        qp.send(TAG_SEND | slot as u64, &self.send, off, sent)?;
        Ok(())
    }

    /// Copy the first `len` bytes of slot `slot`'s data buffer (a read's data, once its
    /// response arrived) into `out`.
    pub fn read_data(
        &mut self,
        slot: u16,
        len: usize,
        out: GuestBuffers<'_>,
    ) -> Result<(), HostLinkError> {
        if len > SLOT_BYTES || usize::from(slot) >= self.slots {
            return Err(HostLinkError::TooLong(len));
        }
        self.scratch.clear();
        self.scratch.resize(len, 0);
        self.data
            .read(usize::from(slot) * SLOT_BYTES, &mut self.scratch)?;
        out.write_at(0, &self.scratch);
        Ok(())
    }

    /// Response capsules that arrived, into `out`.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize, HostLinkError> {
        if let Some(why) = &self.failed {
            return Err(HostLinkError::Failed(why.clone()));
        }
        self.cq.drain_events();
        let mut wcs = std::mem::take(&mut self.wcs);
        let n = self.cq.poll(&mut wcs);
        let r = n.map_err(HostLinkError::from).and_then(|n| {
            let mut got = 0;
            for wc in &wcs[..n] {
                got += self.completion(wc, out)?;
            }
            Ok(got)
        });
        self.wcs = wcs;
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
        }
        r
    }

    fn completion(
        &mut self,
        wc: &WorkCompletion,
        out: &mut Vec<Completion>,
    ) -> Result<usize, HostLinkError> {
        if wc.status != consts::WC_SUCCESS {
            return Err(HostLinkError::Failed(format!(
                "{} (vendor error {:#x})",
                wc_status_text(wc.status),
                wc.vendor_err
            )));
        }
        if wc.wr_id & !0xff_ffff_ffff_ffff != TAG_RECV {
            return Ok(0);
        }
        let b = (wc.wr_id & 0xff_ffff_ffff_ffff) as usize;
        if b >= self.recv_n {
            return Err(HostLinkError::Failed(format!("receive {b} never posted")));
        }
        if wc.byte_len as usize != RESPONSE_BYTES {
            return Err(HostLinkError::BadResponse(wc.byte_len as usize));
        }
        let mut raw = [0u8; RESPONSE_BYTES];
        self.recv.read(b * RESPONSE_BYTES, &mut raw)?;
        let qp = self.id.qp().ok_or(VerbsError::OutOfRange("queue pair"))?;
        qp.post_recv(
            TAG_RECV | b as u64,
            &self.recv,
            b * RESPONSE_BYTES,
            RESPONSE_BYTES,
        )?;
        let cqe = Completion::read_from_bytes(&raw).map_err(|_| HostLinkError::BadResponse(16))?;
        out.push(cqe);
        Ok(1)
    }

    /// Sleep until a completion may have arrived, or `deadline`.
    pub fn wait(&mut self, deadline: Instant) -> Result<(), HostLinkError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HostLinkError::Timeout("command"));
        }
        if self.cq.arm()? {
            // something may have arrived before arming: the caller polls again at once
            return Ok(());
        }
        let mut fds = [sys_util::poll::PollFd {
            fd: self.cq.fd(),
            events: sys_util::poll::POLLIN,
            revents: 0,
        }];
        let _ = sys_util::poll::poll(&mut fds, left.min(Duration::from_millis(50)));
        Ok(())
    }

    /// Disconnect now (commands in flight are given up by the queue above).
    pub fn shutdown(&self) {
        self.id.disconnect();
    }
}
