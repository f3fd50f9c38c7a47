//! One host-side NVMe/RDMA queue's transport: an RDMA CM connection (address and route
//! resolved, queue pair, connect request naming the queue, §3.2), a registered capsule
//! buffer and a registered data buffer per command slot, and receive buffers for response
//! capsules. The queue above (`initiator::queue`) keeps the commands; this moves them.
//!
//! Zero copy: with the guest memory given ([`RdmaHostLink::set_guest_memory`]), each region
//! of the guest's DMA map is registered once per map snapshot (generation), for memory
//! windows only: no remote access of its own. A command whose buffers are one contiguous
//! piece of a region gets a type 2 memory window bound over exactly that piece, for the
//! one direction it moves, and names it with a Keyed SGL (Invalidate Key subtype): the
//! target reaches the guest's buffer and nothing else, and only until the command's
//! response, which invalidates the window (Send with Invalidate; if the target does not,
//! we invalidate it ourselves before the command is reported complete). Registering whole
//! guest memory for remote access instead would hand every target all of the guest's
//! memory.
//!
//! Otherwise data goes through the slot's registered buffer: a write's data is copied
//! there and the command names it with a Keyed SGL (or carries it in the capsule when small
//! and the controller takes in-capsule data); a read's data is written there by the target
//! with RDMA Write before its response arrives (reliable connection ordering) and copied to
//! the guest's buffers then.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_model::GuestMemory;
use device_model::backend::GuestBuffers;
use device_model::memory::MemoryMap;
use nvme_spec::fabrics::sgl_id;
use nvme_spec::{Completion, Submission};
use zerocopy::{FromBytes, IntoBytes};

use super::cm_records::{ConnectRequest, parse_reject};
use super::verbs::{
    self, CmEventKind, CmId, CompletionQueue, EventChannel, GuestMr, MemoryWindow,
    ProtectionDomain, Region, VerbsError, WorkCompletion, consts, wc_status_text,
};

/// Bytes one command may move (each slot has a registered buffer of this size).
pub const SLOT_BYTES: usize = 128 * 1024;
/// Largest command capsule we send: the command and up to 8 KiB of in-capsule data.
const CAPSULE_BYTES: usize = 64 + 8192;
/// A response capsule: one completion.
const RESPONSE_BYTES: usize = 16;

const TAG_RECV: u64 = 1 << 56;
const TAG_SEND: u64 = 2 << 56;
const TAG_BIND: u64 = 3 << 56;
const TAG_INV: u64 = 4 << 56;
const LOW: u64 = (1 << 56) - 1;

/// Guest memory as registered for one map snapshot.
struct GuestRegistration {
    map: Arc<MemoryMap>,
    mrs: Vec<GuestMr>,
}

/// A slot's memory window and what it is doing.
#[derive(Default)]
struct SlotWindow {
    mw: Option<MemoryWindow>,
    /// The key of the window while bound (until invalidated).
    bound: Option<u32>,
    /// The command in the slot moves its data through the window (no copy).
    direct: bool,
    /// Its response, held until our own invalidation of the window completes.
    held: Option<Completion>,
}

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
    /// Per slot: dropped first, as a window bound on the queue pair holds it (Soft-RoCE
    /// waits for that at the queue pair's destruction) and the registrations after it.
    windows: Vec<SlotWindow>,
    // then the id (with its queue pair): no transfer touches the buffers after it
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
    pd: Arc<ProtectionDomain>,
    mem: Option<Arc<GuestMemory>>,
    reg: Option<GuestRegistration>,
    /// Registrations of earlier snapshots, kept while a window may be bound over them.
    retired: Vec<GuestRegistration>,
    /// Memory windows unsupported or guest memory not registrable: copies only.
    no_windows: bool,
    /// Bytes moved straight to or from guest buffers, and through slot buffers.
    pub direct_bytes: u64,
    pub copied_bytes: u64,
    /// Ask the target to invalidate each window with its response (else: we revoke it).
    pub remote_invalidate: bool,
    /// Windows we revoked ourselves (the target kept its access past the response).
    pub local_invalidations: u64,
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
        // a command takes a window bind and a send (and maybe an invalidation)
        let send_n = 3 * slots + 4;
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
        let mut windows: Vec<SlotWindow> = (0..slots).map(|_| SlotWindow::default()).collect();
        let mut no_windows = false;
        for w in &mut windows {
            match MemoryWindow::new(&pd) {
                Ok(mw) => w.mw = Some(mw),
                Err(e) => {
                    log::info!("nvme-rdma {addr}: no memory windows ({e}): data is copied");
                    no_windows = true;
                    break;
                }
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
            pd,
            mem: None,
            reg: None,
            retired: Vec::new(),
            windows,
            no_windows,
            direct_bytes: 0,
            copied_bytes: 0,
            remote_invalidate: true,
            local_invalidations: 0,
        })
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Reach guest buffers in `mem` directly where a command's buffers allow it.
    pub fn set_guest_memory(&mut self, mem: Arc<GuestMemory>) {
        self.mem = Some(mem);
    }

    /// Send command `sqe` (its CID is its slot) moving `len` bytes of `bufs`, to the
    /// controller when `to_controller`: `inline` ones in the capsule, else through a memory
    /// window over the guest's buffers or through the slot's data buffer. A failure fails the
    /// link (the next [`poll`](Self::poll) says so, with the command in flight).
    pub fn submit(
        &mut self,
        sqe: Submission,
        len: usize,
        inline: bool,
        bufs: GuestBuffers<'_>,
        to_controller: bool,
    ) {
        if self.failed.is_some() {
            return;
        }
        if let Err(e) = self.try_submit(sqe, len, inline, bufs, to_controller) {
            self.failed = Some(e.to_string());
        }
    }

    fn try_submit(
        &mut self,
        mut sqe: Submission,
        len: usize,
        inline: bool,
        bufs: GuestBuffers<'_>,
        to_controller: bool,
    ) -> Result<(), HostLinkError> {
        let slot = usize::from(sqe.cid.get());
        if slot >= self.slots {
            return Err(HostLinkError::Failed(format!("no slot {slot}")));
        }
        if len > SLOT_BYTES {
            return Err(HostLinkError::TooLong(len));
        }
        self.windows[slot].direct = false;
        sqe.flags = (sqe.flags & 0x3) | nvme_spec::fabrics::PSDT_SGL;
        let off = slot * CAPSULE_BYTES;
        let mut sent = 64;
        if inline && to_controller && len > 0 && len <= CAPSULE_BYTES - 64 {
            self.scratch.clear();
            self.scratch.resize(len, 0);
            bufs.read_at(0, &mut self.scratch);
            sqe.prp1 = 0.into();
            sqe.prp2 = (len as u64 | (u64::from(sgl_id::INCAPSULE) << 56)).into();
            self.send.write(off + 64, &self.scratch)?;
            sent += len;
            self.copied_bytes += len as u64;
        } else if let Some((addr, key)) = self.bind_direct(slot, bufs, len, to_controller)? {
            sqe.prp1 = addr.into();
            let subtype = if self.remote_invalidate {
                sgl_id::KEYED_INVALIDATE
            } else {
                sgl_id::KEYED
            };
            sqe.prp2 =
                ((len as u64 & 0xff_ffff) | (u64::from(key) << 24) | (u64::from(subtype) << 56))
                    .into();
            self.direct_bytes += len as u64;
        } else {
            let at = slot * SLOT_BYTES;
            if to_controller && len > 0 {
                self.scratch.clear();
                self.scratch.resize(len, 0);
                bufs.read_at(0, &mut self.scratch);
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
            self.copied_bytes += len as u64;
        }
        self.send.write(off, sqe.as_bytes())?;
        let qp = self.id.qp().ok_or(VerbsError::OutOfRange("queue pair"))?;
        qp.send(TAG_SEND | slot as u64, &self.send, off, sent)?;
        Ok(())
    }

    /// Bind slot `slot`'s window over `bufs` (`len` bytes) when they are one contiguous
    /// piece of registered guest memory; the address and key the command names.
    fn bind_direct(
        &mut self,
        slot: usize,
        bufs: GuestBuffers<'_>,
        len: usize,
        to_controller: bool,
    ) -> Result<Option<(u64, u32)>, HostLinkError> {
        if self.no_windows || len == 0 || self.windows[slot].bound.is_some() {
            return Ok(None);
        }
        let Some(mem) = self.mem.clone() else {
            return Ok(None);
        };
        // one contiguous run of host addresses
        let mut segs = bufs.segments();
        let Some((start, first)) = segs.next() else {
            return Ok(None);
        };
        let mut end = start + first;
        for (a, n) in segs {
            if a != end {
                return Ok(None);
            }
            end += n;
        }
        if end - start != len {
            return Ok(None);
        }
        // registered once per map snapshot (a pointer compare per command)
        let current = mem.load();
        if !self
            .reg
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(&r.map, &current))
        {
            let map = Arc::clone(&current);
            drop(current);
            if let Err(e) = self.register(map) {
                device_model::warn_limited!(
                    "nvme-rdma {}: registering guest memory: {e}; data is copied",
                    self.peer
                );
                self.no_windows = true;
                return Ok(None);
            }
        }
        let Some(reg) = &self.reg else {
            return Ok(None);
        };
        let (start, len64) = (start as u64, len as u64);
        let Some(mr) = reg.mrs.iter().find(|m| m.contains(start, len64)) else {
            return Ok(None);
        };
        let qp = self.id.qp().ok_or(VerbsError::OutOfRange("queue pair"))?;
        let w = &mut self.windows[slot];
        let Some(mw) = w.mw.as_mut() else {
            return Ok(None);
        };
        // the target writes guest memory for a read, reads it for a write; nothing else
        let key = qp.bind_window(
            TAG_BIND | slot as u64,
            mw,
            mr,
            (start, len64),
            !to_controller,
        )?;
        w.bound = Some(key);
        w.direct = true;
        Ok(Some((start, key)))
    }

    /// Register every region of `map`; the previous registration is kept while windows may
    /// be bound over it.
    fn register(&mut self, map: Arc<MemoryMap>) -> Result<(), VerbsError> {
        let mut mrs = Vec::new();
        for i in 0..map.regions().len() {
            if let Some(mr) = GuestMr::register(&self.pd, &map, i)? {
                mrs.push(mr);
            }
        }
        log::debug!(
            "nvme-rdma {}: guest memory registered ({} regions)",
            self.peer,
            mrs.len()
        );
        if let Some(old) = self.reg.replace(GuestRegistration { map, mrs }) {
            self.retired.push(old);
        }
        Ok(())
    }

    /// Copy the first `len` bytes of slot `slot`'s data buffer (a read's data, once its
    /// response arrived) into `out`; nothing to do when the target wrote them there itself.
    pub fn read_data(
        &mut self,
        slot: u16,
        len: usize,
        out: GuestBuffers<'_>,
    ) -> Result<(), HostLinkError> {
        if len > SLOT_BYTES || usize::from(slot) >= self.slots {
            return Err(HostLinkError::TooLong(len));
        }
        if self.windows[usize::from(slot)].direct {
            return Ok(());
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
        if !self.retired.is_empty() && self.windows.iter().all(|w| w.bound.is_none()) {
            self.retired.clear();
        }
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
        let low = wc.wr_id & LOW;
        match wc.wr_id & !LOW {
            TAG_RECV => {}
            TAG_INV => {
                // our own invalidation done: the held response goes up now
                let Some(w) = self.windows.get_mut(low as usize) else {
                    return Ok(0);
                };
                w.bound = None;
                return Ok(w.held.take().map_or(0, |cqe| {
                    out.push(cqe);
                    1
                }));
            }
            _ => return Ok(0),
        }
        let b = low as usize;
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
        let slot = usize::from(cqe.cid.get());
        if let Some(w) = self.windows.get_mut(slot)
            && let Some(key) = w.bound
        {
            // the key the target invalidated: rdma-core says IBV_WC_WITH_INV (bit 3); Soft-RoCE
            // passes the kernel's IB_WC_WITH_INVALIDATE (bit 2) through unchanged. The key must
            // be ours either way. (Invalidating an already invalidated window locally makes
            // the guest kernel's rxe 6.12 oops, so the flag must not be missed.)
            let flagged = wc.wc_flags & (consts::WC_WITH_INV | consts::WC_WITH_INV_KERNEL) != 0;
            let remote_inv = flagged && wc.imm_or_rkey == key;
            if !remote_inv {
                // the target kept its access: revoke it before the command completes
                w.held = Some(cqe);
                qp.invalidate(TAG_INV | slot as u64, key, true)?;
                self.local_invalidations += 1;
                return Ok(0);
            }
            w.bound = None;
        }
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

impl Drop for RdmaHostLink {
    fn drop(&mut self) {
        if self.direct_bytes + self.copied_bytes > 0 {
            log::info!(
                "nvme-rdma {}: {} bytes moved straight to or from guest buffers (memory windows), {} copied; {} windows revoked by the host",
                self.peer,
                self.direct_bytes,
                self.copied_bytes,
                self.local_invalidations
            );
        }
    }
}
