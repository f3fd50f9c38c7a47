//! One host-side NVMe/TCP queue: a TCP connection, its initialization (ICReq/ICResp and
//! Fabrics Connect, TCP transport 1.0 §3.3 and base 2.0 §6.3) and the commands in flight on
//! it. After set-up nothing blocks: [`HostQueue::submit`] queues a command capsule and
//! [`HostQueue::poll`] moves data (C2HData into the command's buffers, H2CData for each
//! R2T) and reports completions. Only the `*_sync` helpers wait.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use nvme_spec::fabrics::{self, ConnectData, fctype, sgl_id};
use nvme_spec::tcp::{DGST_DATA, DGST_HEADER, fes};
use nvme_spec::{Status, Submission};
use zerocopy::IntoBytes;

use device_model::backend::{GuestBufferList, GuestBuffers};

use crate::pdu::{self, Direction, Negotiated, Pdu, PduError};
use crate::stream::{PduStream, StreamError};

/// Largest transfer of one command (the receive buffer holds one C2HData PDU of it: a
/// Linux target sends a read's data in one PDU).
pub const MAX_TRANSFER: usize = 4 << 20;

/// In-capsule data an NVMe/TCP admin queue accepts (TCP transport 1.0 §3.3.2: 8 KiB).
pub const ADMIN_INLINE: usize = 8192;

/// Tag of commands issued by the `*_sync` helpers.
pub const SYNC_TAG: u64 = u64::MAX;

/// Data direction of a command and its buffers. The buffers must stay valid until the
/// command completes (or the queue is dropped): [`GuestBuffers`]' contract.
#[derive(Clone, Copy, Debug)]
pub enum Data<'a> {
    None,
    /// Controller to host (reads).
    FromController(GuestBuffers<'a>),
    /// Host to controller (writes).
    ToController(GuestBuffers<'a>),
}

impl<'a> Data<'a> {
    /// `bufs` moved the way the two flags say (neither: no data).
    pub fn of(from_controller: bool, to_controller: bool, bufs: GuestBuffers<'a>) -> Self {
        if from_controller {
            Data::FromController(bufs)
        } else if to_controller {
            Data::ToController(bufs)
        } else {
            Data::None
        }
    }
}

/// Data of a command run by [`HostQueue::sync`]: buffers of the caller's, borrowed for the
/// call.
#[derive(Debug)]
pub enum SyncData<'a> {
    None,
    /// Controller to host (Identify, log pages, reads).
    FromController(&'a mut [u8]),
    /// Host to controller (Connect data, DSM ranges, writes).
    ToController(&'a [u8]),
}

/// A finished command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completed {
    pub tag: u64,
    pub status: Status,
    /// Completion dwords 0 and 1 (Property Get's value, Connect's CNTLID).
    pub result: u64,
}

/// A command taken off a dropped connection, as it was submitted.
#[derive(Clone, Debug)]
pub struct Unfinished {
    pub tag: u64,
    pub sqe: Submission,
    pub from_controller: bool,
    pub to_controller: bool,
    pub segs: GuestBufferList,
}

impl Unfinished {
    /// Its data description for [`HostQueue::submit`].
    pub fn data(&self) -> Data<'_> {
        Data::of(
            self.from_controller,
            self.to_controller,
            self.segs.as_buffers(),
        )
    }
}

/// Errors of a queue: the connection is no longer usable, or set-up was refused.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("controller refused {what}: status {status:?}")]
    Refused { what: &'static str, status: Status },
    #[error("no free command slot")]
    Full,
    #[cfg(feature = "rdma")]
    #[error(transparent)]
    Rdma(#[from] crate::rdma::host_link::HostLinkError),
}

/// The transport under a queue.
#[derive(Debug)]
enum HostLink {
    Tcp(PduStream),
    #[cfg(feature = "rdma")]
    Rdma(Box<crate::rdma::host_link::RdmaHostLink>),
}

/// Who we are and what we connect to.
#[derive(Clone, Debug)]
pub struct ConnectParams {
    pub addr: SocketAddr,
    pub subnqn: String,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub header_digest: bool,
    pub data_digest: bool,
    pub transport: super::Transport,
    /// Time allowed for each set-up step and each synchronous command.
    pub timeout: Duration,
    /// NVMe/RDMA: ask the target to invalidate each command's memory window with its
    /// response (Keyed SGL, Invalidate Key); without, the host revokes it itself.
    pub remote_invalidate: bool,
}

#[derive(Debug, Default)]
struct Cmd {
    active: bool,
    sqe: Submission,
    tag: u64,
    from_controller: bool,
    to_controller: bool,
    len: usize,
    segs: GuestBufferList,
    /// A data digest failed: the command fails whatever its completion says.
    digest_error: bool,
    /// Coarse time of submission, for I/O timeouts.
    tick: u64,
}

/// One connected queue (admin or I/O).
#[derive(Debug)]
pub struct HostQueue {
    link: HostLink,
    qid: u16,
    cntlid: u16,
    inline_max: usize,
    maxh2cdata: usize,
    cmds: Vec<Cmd>,
    free: Vec<u16>,
    /// Completions seen while a synchronous command waited, delivered by the next poll.
    stash: Vec<Completed>,
    /// Response capsules of one RDMA poll (reused).
    #[cfg(feature = "rdma")]
    responses: Vec<nvme_spec::Completion>,
    peer: String,
}

impl HostQueue {
    /// Open a TCP connection, initialize it and connect queue `qid` of `entries` slots to
    /// controller `cntlid` (`CNTLID_DYNAMIC` for the admin queue), asking for keep alive
    /// `kato_ms`.
    pub fn connect(
        p: &ConnectParams,
        qid: u16,
        entries: u16,
        cntlid: u16,
        kato_ms: u32,
    ) -> Result<Self, QueueError> {
        let (link, maxh2cdata, inline_max) = match p.transport {
            super::Transport::Tcp => {
                let (stream, maxh2cdata) = Self::tcp_stream(p)?;
                (HostLink::Tcp(stream), maxh2cdata, ADMIN_INLINE)
            }
            #[cfg(feature = "rdma")]
            super::Transport::Rdma => {
                let mut l =
                    crate::rdma::host_link::RdmaHostLink::connect(p.addr, qid, entries, p.timeout)?;
                l.remote_invalidate = p.remote_invalidate;
                // no in-capsule data on an NVMe/RDMA admin queue (IOCCSZ comes later)
                (HostLink::Rdma(Box::new(l)), 0, 0)
            }
            #[cfg(not(feature = "rdma"))]
            super::Transport::Rdma => {
                return Err(StreamError::Unexpected(
                    "this build has no RDMA transport (cargo feature rdma)",
                )
                .into());
            }
        };
        let peer = match &link {
            HostLink::Tcp(stream) => stream.peer().clone(),
            #[cfg(feature = "rdma")]
            HostLink::Rdma(l) => l.peer().to_string(),
        };
        // an SQ of `entries` holds entries - 1 commands (base 2.0 §3.3.1.5)
        let depth = entries.max(2) - 1;
        let mut q = Self {
            link,
            qid,
            cntlid,
            inline_max,
            maxh2cdata,
            cmds: (0..depth).map(|_| Cmd::default()).collect(),
            free: (0..depth).rev().collect(),
            stash: Vec::new(),
            #[cfg(feature = "rdma")]
            responses: Vec::new(),
            peer,
        };
        let mut data = ConnectData::default();
        data.hostid = p.hostid;
        data.cntlid = cntlid.into();
        fabrics::put_str(&mut data.subnqn, &p.subnqn);
        fabrics::put_str(&mut data.hostnqn, &p.hostnqn);
        let mut sqe = fabrics_sqe(fctype::CONNECT);
        sqe.cdw10 = (u32::from(qid) << 16).into();
        sqe.cdw11 = u32::from(entries - 1).into();
        sqe.cdw12 = kato_ms.into();
        let c = q.sync(sqe, SyncData::ToController(data.as_bytes()), p.timeout)?;
        if !c.status.is_success() {
            return Err(QueueError::Refused {
                what: "Connect",
                status: c.status,
            });
        }
        q.cntlid = c.result as u16;
        Ok(q)
    }

    /// Open a TCP connection and initialize it (ICReq/ICResp); returns the stream and the
    /// target's MAXH2CDATA.
    fn tcp_stream(p: &ConnectParams) -> Result<(PduStream, usize), QueueError> {
        let sock = TcpStream::connect_timeout(&p.addr, p.timeout).map_err(|source| {
            QueueError::Connect {
                addr: p.addr,
                source,
            }
        })?;
        let mut stream =
            PduStream::new(sock, Direction::ToHost, MAX_TRANSFER).map_err(|source| {
                QueueError::Connect {
                    addr: p.addr,
                    source,
                }
            })?;
        let want = if p.header_digest { DGST_HEADER } else { 0 }
            | if p.data_digest { DGST_DATA } else { 0 };
        stream.tx.push(
            &Pdu::IcReq {
                pfv: 0,
                hpda: 0,
                dgst: want,
                maxr2t: 0,
            },
            &Negotiated::default(),
        );
        let deadline = Instant::now() + p.timeout;
        let (dgst, maxh2cdata) = loop {
            match stream.rx.next_pdu(&Negotiated::default()) {
                Ok(Some(Pdu::IcResp {
                    pfv: 0,
                    cpda: 0,
                    dgst,
                    maxh2cdata,
                })) => {
                    break (dgst, maxh2cdata);
                }
                Ok(Some(Pdu::IcResp { .. })) => {
                    stream.terminate(fes::INVALID_HEADER_FIELD, 8, false);
                    return Err(StreamError::Unexpected(
                        "ICResp with a PDU format version or data alignment (CPDA) we do not support",
                    )
                    .into());
                }
                Ok(Some(Pdu::TermReq { fes, fei, .. })) => {
                    return Err(StreamError::Terminated { fes, fei }.into());
                }
                Ok(Some(_)) => {
                    stream.terminate(fes::PDU_SEQUENCE_ERROR, 0, false);
                    return Err(StreamError::Unexpected("PDU other than ICResp").into());
                }
                Ok(None) => {
                    stream
                        .wait(deadline)
                        .map_err(|e| timeout_ms(e, p.timeout))?;
                }
                Err(e) => return Err(fatal(&mut stream, e).into()),
            }
        };
        if dgst & !want != 0 {
            stream.terminate(fes::UNSUPPORTED_PARAMETER, 11, false);
            return Err(
                StreamError::Unexpected("controller enabled a digest we did not ask for").into(),
            );
        }
        stream.neg = Negotiated {
            header_digest: dgst & DGST_HEADER != 0,
            data_digest: dgst & DGST_DATA != 0,
            max_data: MAX_TRANSFER as u32,
        };
        Ok((stream, (maxh2cdata as usize).min(MAX_TRANSFER)))
    }

    /// The controller this queue belongs to.
    pub fn cntlid(&self) -> u16 {
        self.cntlid
    }

    /// The queue id.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// The target's address, for logs.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Let the transport reach buffers in `mem` (a controller's guest memory) directly where
    /// it can (RDMA: memory windows over registered guest memory; TCP copies anyway).
    pub fn set_guest_memory(&mut self, mem: &std::sync::Arc<device_model::GuestMemory>) {
        #[cfg(feature = "rdma")]
        if let HostLink::Rdma(l) = &mut self.link {
            l.set_guest_memory(std::sync::Arc::clone(mem));
        }
        #[cfg(not(feature = "rdma"))]
        let _ = mem;
    }

    /// Set how much data an I/O command may carry in its capsule (from IOCCSZ).
    pub fn set_inline_max(&mut self, bytes: usize) {
        self.inline_max = bytes.min(MAX_TRANSFER);
    }

    /// Tags of the commands in flight submitted at or before `tick`.
    pub fn older_than(&self, tick: u64) -> impl Iterator<Item = u64> + '_ {
        self.cmds
            .iter()
            .filter(move |c| c.active && c.tick <= tick)
            .map(|c| c.tag)
    }

    /// Queue command `sqe` (its CID and data pointer are filled in here) with `data`. The
    /// capsule is sent by the next [`poll`](Self::poll).
    #[cfg_attr(not(feature = "rdma"), allow(clippy::infallible_destructuring_match))]
    pub fn submit(
        &mut self,
        mut sqe: Submission,
        tag: u64,
        data: Data<'_>,
        tick: u64,
    ) -> Result<(), QueueError> {
        let Some(cid) = self.free.pop() else {
            return Err(QueueError::Full);
        };
        let (bufs, from_c, to_c) = match data {
            Data::None => (GuestBuffers::EMPTY, false, false),
            Data::FromController(b) => (b, true, false),
            Data::ToController(b) => (b, false, true),
        };
        let len = bufs.len() as usize;
        let cmd = &mut self.cmds[cid as usize];
        cmd.active = true;
        cmd.tag = tag;
        cmd.from_controller = from_c;
        cmd.to_controller = to_c;
        cmd.len = len;
        cmd.segs.set(bufs);
        cmd.digest_error = false;
        cmd.tick = tick;
        cmd.sqe = sqe;
        sqe.cid = cid.into();
        sqe.flags = (sqe.flags & 0x3) | fabrics::PSDT_SGL;
        let inline = to_c && len <= self.inline_max;
        let stream = match &mut self.link {
            HostLink::Tcp(stream) => stream,
            #[cfg(feature = "rdma")]
            HostLink::Rdma(l) => {
                // a failure shows in the next poll, with the command in flight
                l.submit(
                    sqe,
                    len,
                    inline,
                    self.cmds[cid as usize].segs.as_buffers(),
                    to_c,
                );
                return Ok(());
            }
        };
        let id = if inline {
            sgl_id::INCAPSULE
        } else {
            sgl_id::TRANSPORT
        };
        sqe.prp1 = 0.into();
        sqe.prp2 = (len as u64 | (u64::from(id) << 56)).into();
        let neg = stream.neg;
        let out = stream.tx.out();
        let capsule = Pdu::CapsuleCmd { sqe, data: &[] };
        if inline && len > 0 {
            let dd = pdu::encode_header(&capsule, len, &neg, out);
            append_data(out, self.cmds[cid as usize].segs.as_buffers(), 0, len, dd);
        } else {
            pdu::encode_header(&capsule, 0, &neg, out);
        }
        // sent by the next poll (one send for every command queued since), which also
        // reports a send error, with the command already in flight (so `drain` lists it
        // exactly once)
        Ok(())
    }

    /// Send and receive what the socket allows, answer R2Ts, place C2H data, and hand every
    /// finished command to `done`. Returns how many finished. An error means the
    /// connection is finished; its commands are still listed by [`drain`](Self::drain).
    pub fn poll(&mut self, done: &mut dyn FnMut(Completed)) -> Result<usize, QueueError> {
        let mut n = 0;
        for c in self.stash.drain(..) {
            done(c);
            n += 1;
        }
        match &mut self.link {
            HostLink::Tcp(_) => self.poll_tcp(done, n),
            #[cfg(feature = "rdma")]
            HostLink::Rdma(_) => self.poll_rdma(done, n),
        }
    }

    /// [`poll`](Self::poll) over TCP: PDUs in, R2Ts answered, C2H data placed.
    #[cfg_attr(not(feature = "rdma"), allow(irrefutable_let_patterns))]
    fn poll_tcp(
        &mut self,
        done: &mut dyn FnMut(Completed),
        mut n: usize,
    ) -> Result<usize, QueueError> {
        let Self {
            link: HostLink::Tcp(stream),
            cmds,
            free,
            maxh2cdata,
            ..
        } = self
        else {
            return Ok(n);
        };
        stream.pump()?;
        loop {
            let neg = stream.neg;
            let pdu = match stream.rx.next_pdu(&neg) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(PduError::DataDigest(f)) => {
                    let cid = f.cccid;
                    if let Some(c) = cmds.get_mut(cid as usize).filter(|c| c.active) {
                        c.digest_error = true;
                        // no response capsule follows a C2HData with SUCCESS: fail it now
                        if f.success {
                            let tag = c.tag;
                            c.active = false;
                            free.push(cid);
                            done(Completed {
                                tag,
                                status: Status::DATA_TRANSFER_ERROR,
                                result: 0,
                            });
                            n += 1;
                        }
                    }
                    continue;
                }
                Err(e) => return Err(fatal(stream, e).into()),
            };
            match pdu {
                Pdu::CapsuleResp { cqe } => {
                    let cid = cqe.cid.get();
                    let Some(cmd) = cmds.get_mut(cid as usize).filter(|c| c.active) else {
                        stream.terminate(fes::INVALID_HEADER_FIELD, 8 + 12, false);
                        return Err(StreamError::Unexpected(
                            "response for a command not in flight",
                        )
                        .into());
                    };
                    let mut status = Status::from_cqe_bits(cqe.status.get());
                    if cmd.digest_error && status.is_success() {
                        status = Status::DATA_TRANSFER_ERROR;
                    }
                    let result = u64::from(cqe.dw0.get()) | (u64::from(cqe.dw1.get()) << 32);
                    let tag = cmd.tag;
                    cmd.active = false;
                    free.push(cid);
                    done(Completed {
                        tag,
                        status,
                        result,
                    });
                    n += 1;
                }
                Pdu::C2HData {
                    cccid,
                    offset,
                    data,
                    last,
                    success,
                } => {
                    let Some(cmd) = cmds
                        .get_mut(cccid as usize)
                        .filter(|c| c.active && c.from_controller)
                    else {
                        stream.terminate(fes::INVALID_HEADER_FIELD, 8, false);
                        return Err(
                            StreamError::Unexpected("C2HData for a command not reading").into()
                        );
                    };
                    let off = offset as usize;
                    if off + data.len() > cmd.len {
                        stream.terminate(fes::DATA_OUT_OF_RANGE, 12, false);
                        return Err(
                            StreamError::Unexpected("C2HData beyond the command's data").into()
                        );
                    }
                    cmd.segs.as_buffers().write_at(off, data);
                    if success && last {
                        let status = if cmd.digest_error {
                            Status::DATA_TRANSFER_ERROR
                        } else {
                            Status::SUCCESS
                        };
                        let tag = cmd.tag;
                        cmd.active = false;
                        free.push(cccid);
                        done(Completed {
                            tag,
                            status,
                            result: 0,
                        });
                        n += 1;
                    }
                }
                Pdu::R2T {
                    cccid,
                    ttag,
                    offset,
                    length,
                } => {
                    let Some(cmd) = cmds
                        .get(cccid as usize)
                        .filter(|c| c.active && c.to_controller)
                    else {
                        stream.terminate(fes::INVALID_HEADER_FIELD, 8, false);
                        return Err(StreamError::Unexpected("R2T for a command not writing").into());
                    };
                    let (off, len) = (offset as usize, length as usize);
                    if len == 0 || off + len > cmd.len {
                        stream.terminate(fes::DATA_OUT_OF_RANGE, 12, false);
                        return Err(StreamError::Unexpected("R2T beyond the command's data").into());
                    }
                    let out = stream.tx.out();
                    let mut at = off;
                    while at < off + len {
                        let chunk = (off + len - at).min(*maxh2cdata);
                        let h2c = Pdu::H2CData {
                            cccid,
                            ttag,
                            offset: at as u32,
                            data: &[],
                            last: at + chunk == off + len,
                        };
                        let dd = pdu::encode_header(&h2c, chunk, &neg, out);
                        append_data(out, cmd.segs.as_buffers(), at, chunk, dd);
                        at += chunk;
                    }
                    stream.flush()?;
                }
                Pdu::TermReq { fes, fei, .. } => {
                    return Err(StreamError::Terminated { fes, fei }.into());
                }
                _ => {
                    stream.terminate(fes::PDU_SEQUENCE_ERROR, 0, false);
                    return Err(StreamError::Unexpected("PDU a host never receives").into());
                }
            }
        }
        Ok(n)
    }

    /// [`poll`](Self::poll) over RDMA: response capsules in; a read's data, written into
    /// its slot's buffer by the target before the response, copied to its buffers.
    #[cfg(feature = "rdma")]
    fn poll_rdma(
        &mut self,
        done: &mut dyn FnMut(Completed),
        mut n: usize,
    ) -> Result<usize, QueueError> {
        let HostLink::Rdma(l) = &mut self.link else {
            return Ok(n);
        };
        let mut cqes = std::mem::take(&mut self.responses);
        cqes.clear();
        let polled = l.poll(&mut cqes);
        let mut bad = None;
        for cqe in &cqes {
            let cid = cqe.cid.get();
            let Some(cmd) = self.cmds.get_mut(cid as usize).filter(|c| c.active) else {
                bad = Some(crate::rdma::host_link::HostLinkError::UnknownResponse(cid));
                break;
            };
            let mut status = Status::from_cqe_bits(cqe.status.get());
            if status.is_success()
                && cmd.from_controller
                && cmd.len > 0
                && let Err(e) = l.read_data(cid, cmd.len, cmd.segs.as_buffers())
            {
                device_model::warn_limited!("nvme-rdma {}: {e}", self.peer);
                status = Status::DATA_TRANSFER_ERROR;
            }
            let result = u64::from(cqe.dw0.get()) | (u64::from(cqe.dw1.get()) << 32);
            let tag = cmd.tag;
            cmd.active = false;
            self.free.push(cid);
            done(Completed {
                tag,
                status,
                result,
            });
            n += 1;
        }
        self.responses = cqes;
        if let Some(e) = bad {
            l.shutdown();
            return Err(e.into());
        }
        polled?;
        Ok(n)
    }

    /// Take every command in flight (the connection is being dropped), to submit again
    /// elsewhere, and the completions not yet reported.
    pub fn drain(&mut self) -> (Vec<Unfinished>, Vec<Completed>) {
        let mut cmds = Vec::new();
        for (cid, c) in self.cmds.iter_mut().enumerate() {
            if c.active && c.tag != SYNC_TAG {
                c.active = false;
                cmds.push(Unfinished {
                    tag: c.tag,
                    sqe: c.sqe,
                    from_controller: c.from_controller,
                    to_controller: c.to_controller,
                    segs: std::mem::take(&mut c.segs),
                });
                self.free.push(cid as u16);
            }
        }
        (cmds, std::mem::take(&mut self.stash))
    }

    /// Free command slots.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Submit `sqe` and wait for its completion (other completions are kept for the next
    /// poll).
    pub fn sync(
        &mut self,
        sqe: Submission,
        data: SyncData<'_>,
        timeout: Duration,
    ) -> Result<Completed, QueueError> {
        let (base, len, from_c, to_c) = match data {
            SyncData::None => (std::ptr::null_mut(), 0, false, false),
            SyncData::FromController(b) => (b.as_mut_ptr(), b.len(), true, false),
            SyncData::ToController(b) => (b.as_ptr().cast_mut(), b.len(), false, true),
        };
        let iov = [libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        }];
        // SAFETY: the slice `data` borrows stays borrowed (and so valid and untouched by Rust
        // code) for this call; the command's buffers are forgotten before it returns unless
        // the command completed (`forget_sync_buffers`). A ToController buffer is only read:
        // the queue writes into a command's buffers only for FromController data.
        let bufs = unsafe { GuestBuffers::from_raw_iovecs(if len == 0 { &[] } else { &iov }) };
        let r = self.sync_inner(sqe, Data::of(from_c, to_c, bufs), timeout);
        if r.is_err() {
            self.forget_sync_buffers();
        }
        r
    }

    /// A synchronous command that did not complete keeps its slot (its CID may still be
    /// answered) but no buffers: data the controller still sends or asks for for it is
    /// refused as out of range, which ends the connection.
    fn forget_sync_buffers(&mut self) {
        for c in &mut self.cmds {
            if c.active && c.tag == SYNC_TAG {
                c.segs.clear();
                c.len = 0;
            }
        }
    }

    fn sync_inner(
        &mut self,
        sqe: Submission,
        data: Data<'_>,
        timeout: Duration,
    ) -> Result<Completed, QueueError> {
        self.submit(sqe, SYNC_TAG, data, 0)?;
        let deadline = Instant::now() + timeout;
        let mut got = None;
        let mut others = Vec::new();
        loop {
            let polled = self.poll(&mut |c| {
                if c.tag == SYNC_TAG {
                    got = Some(c);
                } else {
                    others.push(c);
                }
            });
            if let Err(e) = polled {
                // completions seen meanwhile are not lost with the connection
                self.stash = others;
                return Err(e);
            }
            if let Some(c) = got {
                self.stash = others;
                return Ok(c);
            }
            let waited = match &mut self.link {
                HostLink::Tcp(stream) => stream
                    .wait(deadline)
                    .map(|_| ())
                    .map_err(|e| QueueError::from(timeout_ms(e, timeout))),
                #[cfg(feature = "rdma")]
                HostLink::Rdma(l) => l.wait(deadline).map_err(QueueError::from),
            };
            if let Err(e) = waited {
                self.stash = others;
                return Err(e);
            }
        }
    }

    /// Close the connection now.
    pub fn shutdown(&self) {
        match &self.link {
            HostLink::Tcp(stream) => stream.shutdown(),
            #[cfg(feature = "rdma")]
            HostLink::Rdma(l) => l.shutdown(),
        }
    }
}

/// A Fabrics command (opcode 7Fh) of type `t`.
pub fn fabrics_sqe(t: u8) -> Submission {
    let mut sqe = Submission::default();
    sqe.opcode = fabrics::OPCODE;
    // FCTYPE is byte 4 of the command: the low byte of the NSID field.
    sqe.nsid = u32::from(t).into();
    sqe
}

fn timeout_ms(e: StreamError, t: Duration) -> StreamError {
    match e {
        StreamError::Timeout(_) => StreamError::Timeout(t.as_millis() as u64),
        e => e,
    }
}

/// A fatal PDU error on our side: send the H2C termination request, report the error.
fn fatal(stream: &mut PduStream, e: PduError) -> StreamError {
    if let PduError::Fatal { fes, fei, .. } = e {
        stream.terminate(fes, fei, false);
    }
    StreamError::Protocol(e)
}

/// Append `len` bytes of the command's buffers from `off` to `out`, then the data digest
/// when `dd`.
fn append_data(out: &mut Vec<u8>, bufs: GuestBuffers<'_>, off: usize, len: usize, dd: bool) {
    let start = out.len();
    out.resize(start + len, 0);
    let n = bufs.read_at(off, &mut out[start..]);
    out.truncate(start + n);
    if dd {
        let c = pdu::data_digest([&out[start..]]);
        out.extend_from_slice(&c.to_le_bytes());
    }
}
