//! One pass of the target, run by a reactor ([`device_model::Poller`]): accept connections,
//! read and dispatch PDUs, collect the controllers' completions, time Keep Alive.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};
use sys_util::poll;

use nvme_spec::registers::{self as reg, csts};
use nvme_spec::tcp::fes;

use crate::pdu::{Direction, Negotiated, Pdu, PduError};
use crate::stream::{PduStream, StreamError};

use super::connection::{Conn, Link, Role};
use super::{Export, ExportSpec, INLINE_DATA};

/// Keep Alive is checked this often; a host gets KATO plus this much grace.
const KATO_CHECK: Duration = Duration::from_millis(100);
/// Connections at once (each has a receive buffer of the largest PDU).
pub(super) const MAX_CONNECTIONS: usize = 256;
/// Time allowed from accept to a finished Connect.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an association's controller may take to reset before it is reused anyway.
const DRAIN_WAIT: Duration = Duration::from_secs(5);
/// Unsent bytes a connection may have queued before its PDUs are no longer read.
const TX_BACKLOG: usize = 8 << 20;

pub(super) struct Target {
    pub listeners: Vec<(TcpListener, SocketAddr)>,
    pub conns: Vec<Option<Conn>>,
    pub exports: Vec<Export>,
    /// Discovery log generation counter.
    pub genctr: u64,
    /// Data of the PDU being handled, copied out of the receive buffer (reused).
    pub scratch: Vec<u8>,
    /// When Keep Alive and setup times were last checked.
    pub last_kato: Instant,
    /// The descriptor list of each pass's readiness check and the connection slot of each
    /// (reused).
    pub ready: Vec<poll::PollFd>,
    pub ready_slots: Vec<usize>,
    /// The RDMA listeners, if the target has any.
    #[cfg(feature = "rdma")]
    pub rdma: Option<crate::rdma::port::RdmaPort>,
    /// Completions of one RDMA connection being handled (reused).
    #[cfg(feature = "rdma")]
    pub rdma_events: Vec<crate::rdma::link::LinkEvent>,
    /// Shown every accepted TCP connection (see [`super::KeepHook`]).
    pub keep: Option<super::KeepHook>,
}

impl Target {
    pub fn into_specs(self) -> Vec<ExportSpec> {
        self.exports.into_iter().map(|e| e.spec).collect()
    }

    /// Bring work in: accept, read and dispatch every connection's PDUs (commands go into
    /// the controllers' rings), time Keep Alive and setup, release drained controllers.
    pub fn poll_input(&mut self) -> usize {
        // one poll(2) over every socket says which need a system call (the reactor calls
        // this every pass: an accept and a recv per connection each time would cost more)
        let mut fds = std::mem::take(&mut self.ready);
        let mut slots = std::mem::take(&mut self.ready_slots);
        fds.clear();
        slots.clear();
        self.list_fds(&mut fds, Some(&mut slots));
        if let Err(e) = poll::poll(&mut fds, Duration::ZERO) {
            device_model::warn_limited!("nvme-tcp target: poll: {e}");
            for f in &mut fds {
                f.revents = poll::POLLIN;
            }
        }
        let listeners = self.listeners.len();
        let mut work = 0;
        if fds[..listeners].iter().any(|f| f.revents != 0) {
            work += self.accept();
        }
        for (k, &i) in slots.iter().enumerate() {
            // (a connection closed meanwhile, or a new one in its slot, is looked at again
            // next pass)
            let ready = fds[listeners + k].revents != 0;
            let buffered = self.conns[i]
                .as_mut()
                .and_then(Conn::tcp)
                .is_some_and(|s| s.rx.buffered() > 0);
            if ready || buffered {
                work += self.contained(i, None, |t| t.service(i));
            }
        }
        self.ready_slots = slots;
        self.ready = fds;
        #[cfg(feature = "rdma")]
        {
            work += self.poll_rdma();
        }
        if self.last_kato.elapsed() >= KATO_CHECK {
            self.last_kato = Instant::now();
            self.check_keep_alive();
            self.check_setup_timeouts();
        }
        if self.exports.iter().any(|e| e.draining.is_some()) {
            self.release_drained();
        }
        work
    }

    /// Send results out: every controller's completions and read data to their hosts.
    pub fn poll_output(&mut self) -> usize {
        let mut work = 0;
        for e in 0..self.exports.len() {
            work += self.contained(usize::MAX, Some(e), |t| t.reap(e));
        }
        work
    }

    /// One step of hanging up on every host before this process is replaced (a planned
    /// upgrade, its controllers drained and saved): each TCP connection is closed
    /// gracefully ([`PduStream::hang_up`]), an RDMA one at once, and no association is
    /// ended (the next process takes the controllers over). Nothing is accepted meanwhile:
    /// new hosts wait in the listener's backlog. True once no connection is left.
    pub fn hang_up(&mut self) -> bool {
        for slot in &mut self.conns {
            let Some(c) = slot.as_mut() else { continue };
            // an error: the host is gone already
            let done = c.tcp().is_none_or(|s| s.hang_up().unwrap_or(true));
            if done {
                *slot = None;
            }
        }
        self.conns.iter().all(Option::is_none)
    }

    /// Close every connection (the target is stopping).
    pub fn close_all(&mut self) {
        for i in 0..self.conns.len() {
            self.close(i, "target stopping");
        }
    }

    /// Whether some export has commands in its controller.
    pub fn controller_busy(&self) -> bool {
        self.exports.iter().any(|e| {
            e.assoc
                .as_ref()
                .is_some_and(|a| a.queues.iter().flatten().any(|q| q.busy() > 0))
        })
    }

    /// The descriptors whose readiness means work: listeners, and every connection (for
    /// output too while it has unsent bytes).
    pub fn wait_fds(&self, fds: &mut Vec<poll::PollFd>) {
        self.list_fds(fds, None);
    }

    /// Append the listeners, then every connection (with the slot of each in `slots`).
    fn list_fds(&self, fds: &mut Vec<poll::PollFd>, mut slots: Option<&mut Vec<usize>>) {
        fds.extend(
            self.listeners
                .iter()
                .map(|(l, _)| poll::entry(l, poll::POLLIN)),
        );
        #[cfg(feature = "rdma")]
        if slots.is_none()
            && let Some(r) = &self.rdma
        {
            fds.push(poll::PollFd {
                fd: r.fd(),
                events: poll::POLLIN,
                revents: 0,
            });
        }
        for (i, c) in self.conns.iter().enumerate() {
            match c.as_ref().map(|c| &c.link) {
                Some(Link::Tcp(stream)) => {
                    fds.push(poll::entry(&stream.fd(), stream.events()));
                    if let Some(s) = slots.as_deref_mut() {
                        s.push(i);
                    }
                }
                // RDMA queues are polled every pass; the idle reactor sleeps on their
                // completion channels (armed by `poll_rdma`)
                #[cfg(feature = "rdma")]
                Some(Link::Rdma(l)) if slots.is_none() => {
                    fds.push(poll::PollFd {
                        fd: l.fd(),
                        events: poll::POLLIN,
                        revents: 0,
                    });
                }
                _ => {}
            }
        }
    }

    fn accept(&mut self) -> usize {
        let mut n = 0;
        for port in 0..self.listeners.len() {
            loop {
                let (l, local) = &self.listeners[port];
                let local = *local;
                match l.accept() {
                    Ok((sock, peer)) => {
                        if self.conns.iter().flatten().count() >= MAX_CONNECTIONS {
                            device_model::warn_limited!(
                                "nvme-tcp target: {peer}: {MAX_CONNECTIONS} connections already; refused"
                            );
                            drop(sock);
                            continue;
                        }
                        let max_data = INLINE_DATA.max(self.max_slot_bytes());
                        match PduStream::new(sock, Direction::ToController, max_data) {
                            Ok(stream) => {
                                log::debug!("nvme-tcp target: connection from {peer}");
                                if let Some(keep) = &self.keep {
                                    keep(std::os::fd::AsFd::as_fd(&stream));
                                }
                                self.add_conn(Link::Tcp(stream), Role::Initializing, local);
                                n += 1;
                            }
                            Err(e) => device_model::warn_limited!("nvme-tcp target: {peer}: {e}"),
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        device_model::warn_limited!("nvme-tcp target: accept: {e}");
                        break;
                    }
                }
            }
        }
        n
    }

    /// A new connection on `link`, starting as `role`, reached on `local`.
    pub(super) fn add_conn(&mut self, link: Link, role: Role, local: SocketAddr) {
        let c = Conn {
            link,
            role,
            local,
            hostnqn: String::new(),
            since: Instant::now(),
        };
        match self.conns.iter().position(Option::is_none) {
            Some(i) => self.conns[i] = Some(c),
            None => self.conns.push(Some(c)),
        }
    }

    pub fn max_slot_bytes(&self) -> usize {
        self.exports
            .iter()
            .map(|e| e.host.slot_bytes())
            .max()
            .unwrap_or(INLINE_DATA)
    }

    /// Read, dispatch and flush connection `i`; returns the PDUs handled.
    fn service(&mut self, i: usize) -> usize {
        let Some(stream) = self.conns[i].as_mut().and_then(Conn::tcp) else {
            return 0;
        };
        match stream.pump() {
            Ok(_) => {}
            Err(StreamError::Closed) => {
                self.host_closed(i);
                return 0;
            }
            Err(e) => {
                self.close(i, &e.to_string());
                return 0;
            }
        }
        let mut n = 0;
        loop {
            let Some(stream) = self.conns[i].as_mut().and_then(Conn::tcp) else {
                return n;
            };
            // backpressure: a host that does not read its responses gets no more served
            if stream.tx.pending() > TX_BACKLOG {
                break;
            }
            let neg = stream.neg;
            let pdu = match stream.rx.next_pdu(&neg) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(PduError::DataDigest(f)) => {
                    n += 1;
                    self.data_digest_error(i, &f);
                    continue;
                }
                Err(PduError::Fatal { fes, fei, what }) => {
                    self.fatal(i, fes, fei, what);
                    return n + 1;
                }
            };
            n += 1;
            // PDUs borrow the receive buffer: data is copied out for the handlers
            match pdu {
                Pdu::IcReq {
                    pfv, hpda, dgst, ..
                } => self.ic_req(i, pfv, hpda, dgst),
                Pdu::CapsuleCmd { sqe, data } => {
                    let mut buf = std::mem::take(&mut self.scratch);
                    buf.clear();
                    buf.extend_from_slice(data);
                    self.capsule(i, sqe, &buf);
                    self.scratch = buf;
                }
                Pdu::H2CData {
                    cccid,
                    ttag,
                    offset,
                    data,
                    last,
                } => {
                    let mut buf = std::mem::take(&mut self.scratch);
                    buf.clear();
                    buf.extend_from_slice(data);
                    self.h2c_data(i, cccid, ttag, offset, &buf, last);
                    self.scratch = buf;
                }
                Pdu::TermReq { fes, fei, .. } => {
                    self.close(
                        i,
                        &format!("host terminated the connection (FES {fes:#x}, FEI {fei})"),
                    );
                    return n;
                }
                _ => {
                    self.fatal(
                        i,
                        fes::INVALID_HEADER_FIELD,
                        0,
                        "PDU type a host never sends",
                    );
                    return n;
                }
            }
        }
        if let Some(c) = self.conns[i].as_mut()
            && let Err(e) = c.flush()
        {
            self.close(i, &e);
        }
        n
    }

    fn ic_req(&mut self, i: usize, pfv: u16, hpda: u8, dgst: u8) {
        let max_h2c = self.max_slot_bytes();
        let Some(c) = self.conns[i].as_mut() else {
            return;
        };
        if !matches!(c.role, Role::Initializing) {
            self.fatal(
                i,
                fes::PDU_SEQUENCE_ERROR,
                0,
                "ICReq on an initialized connection",
            );
            return;
        }
        if pfv != 0 {
            self.fatal(
                i,
                fes::INVALID_HEADER_FIELD,
                8,
                "unsupported PDU format version",
            );
            return;
        }
        if hpda != 0 {
            // we place data right after the header; a host wanting padding is refused
            self.fatal(
                i,
                fes::UNSUPPORTED_PARAMETER,
                10,
                "host PDU data alignment not supported",
            );
            return;
        }
        let resp = Pdu::IcResp {
            pfv: 0,
            cpda: 0,
            dgst,
            maxh2cdata: max_h2c as u32,
        };
        let Some(stream) = c.tcp() else {
            return;
        };
        stream.tx.push(&resp, &Negotiated::default());
        stream.neg = Negotiated {
            header_digest: dgst & nvme_spec::tcp::DGST_HEADER != 0,
            data_digest: dgst & nvme_spec::tcp::DGST_DATA != 0,
            max_data: max_h2c.max(INLINE_DATA) as u32,
        };
        c.role = Role::AwaitingConnect;
    }

    /// A PDU broke the protocol: C2HTermReq, close, and end the association it served.
    pub fn fatal(&mut self, i: usize, fes: u16, fei: u32, what: &str) {
        if let Some(c) = self.conns[i].as_mut() {
            device_model::warn_limited!(
                "nvme-of target: {}: {what}; terminating the connection",
                c.peer()
            );
            c.terminate(fes, fei);
        }
        self.close(i, what);
    }

    /// Run `f` for connection `conn` (or export `export`); a panic in it ends that
    /// connection and its association, logged once, and the target serves the others on.
    pub(super) fn contained(
        &mut self,
        conn: usize,
        export: Option<usize>,
        f: impl FnOnce(&mut Self) -> usize,
    ) -> usize {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self))) {
            Ok(n) => n,
            Err(cause) => {
                let msg = device_model::reactor::panic_message(cause.as_ref());
                device_model::error_limited!(
                    "nvme-tcp target: panic while serving a connection ({msg}); it is closed"
                );
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match export {
                    Some(e) => self.end_association(e, "internal error"),
                    None => self.close(conn, "internal error"),
                }));
                1
            }
        }
    }

    /// Close connection `i`; an association it belongs to ends with it.
    pub fn close(&mut self, i: usize, why: &str) {
        let Some(c) = self.conns[i].as_mut() else {
            return;
        };
        log::debug!("nvme-of target: {}: closing: {why}", c.peer());
        let bound = match c.role {
            Role::Queue { export, .. } | Role::Connecting { export, .. } => Some(export),
            _ => None,
        };
        c.shutdown();
        self.conns[i] = None;
        if let Some(e) = bound {
            self.end_association(e, why);
        }
    }

    /// The host closed connection `i` (TCP: end of stream; RDMA: a disconnect). A host
    /// deletes its I/O queues so before it shuts the controller down on the admin queue
    /// (Linux's nvme-tcp and nvme-rdma do, and nvmet lets them): such a queue is only
    /// detached, its commands' completions dropped; the admin queue's close ends the
    /// association. A connection ended for a protocol error ([`close`](Self::close))
    /// ends its association whatever the queue.
    pub fn host_closed(&mut self, i: usize) {
        let Some(c) = self.conns[i].as_mut() else {
            return;
        };
        let Role::Queue { export, qid } = c.role else {
            self.close(i, "closed by the host");
            return;
        };
        if qid == 0 {
            self.close(i, "closed by the host");
            return;
        }
        log::debug!(
            "nvme-of target: {}: I/O queue {qid} closed by the host",
            c.peer()
        );
        c.shutdown();
        self.conns[i] = None;
        if let Some(q) = self.exports[export].queue_mut(qid) {
            q.conn = None;
        }
    }

    /// Tear down export `e`'s association: close its connections and reset the
    /// controller (CC.EN = 0), which ends every command it still had.
    pub fn end_association(&mut self, e: usize, why: &str) {
        let Some(assoc) = self.exports[e].assoc.take() else {
            return;
        };
        log::info!(
            "nvme-tcp target: {}: association with {} ended: {why}",
            self.exports[e].spec.nqn,
            assoc.hostnqn
        );
        for q in assoc.queues.iter().flatten() {
            if let Some(ci) = q.conn
                && let Some(c) = self.conns[ci].as_mut()
            {
                c.shutdown();
                self.conns[ci] = None;
            }
        }
        // reset the controller; it takes no new association until the reset has finished
        // (its retired commands may still write their slots' buffers until then)
        let ex = &mut self.exports[e];
        ex.spec.handle.write_register(reg::CC, 0, 4);
        // commands the association left in the controller: its host's next one waits
        let left = assoc.queues.iter().flatten().any(|q| q.busy() > 0);
        ex.draining = Some(super::Draining {
            until: Instant::now() + DRAIN_WAIT,
            fence: left.then_some((assoc.hostnqn, assoc.hostid)),
        });
        self.release_drained();
    }

    /// Controllers whose reset (end of an association) has finished, or taken longer than
    /// [`DRAIN_WAIT`], are free for the next association.
    fn release_drained(&mut self) {
        for ex in &mut self.exports {
            let Some(until) = ex.draining.as_ref().map(|d| d.until) else {
                continue;
            };
            let ready = ex.spec.handle.read_register(reg::CSTS, 4) as u32 & csts::RDY != 0;
            if !ready {
                ex.draining = None;
            } else if Instant::now() > until {
                device_model::warn_limited!(
                    "nvme-tcp target: {}: controller still resetting after {} s; reused, and \
                     its last host's next association no longer waits for it",
                    ex.spec.nqn,
                    DRAIN_WAIT.as_secs()
                );
                ex.draining = None;
            }
        }
    }

    /// Connections that have not finished ICReq and Connect in time are closed.
    fn check_setup_timeouts(&mut self) {
        for i in 0..self.conns.len() {
            let stale = self.conns[i].as_ref().is_some_and(|c| {
                matches!(c.role, Role::Initializing | Role::AwaitingConnect)
                    && c.since.elapsed() > SETUP_TIMEOUT
            });
            if stale {
                self.close(i, "no ICReq and Connect in time");
            }
        }
    }

    fn check_keep_alive(&mut self) {
        for e in 0..self.exports.len() {
            let expired = self.exports[e].assoc.as_ref().is_some_and(|a| {
                a.kato_ms > 0
                    && a.last_admin.elapsed()
                        > Duration::from_millis(u64::from(a.kato_ms)) + KATO_CHECK * 5
            });
            if expired {
                self.end_association(e, "keep alive timeout");
            }
        }
    }
}
