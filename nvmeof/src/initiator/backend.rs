//! [`TcpBackend`]: a namespace backend on a remote NVMe/TCP namespace. Its I/O queue's
//! connection is driven from the reactor that polls the front controller (non-blocking
//! sends and receives, no thread per connection); the admin queue and reconnects belong to
//! the session's supervisor thread.
//!
//! Commands in flight when the connection fails are kept and submitted again on the next
//! connection (a read reads again, a write writes the same data again: both idempotent);
//! past the controller loss timeout they complete with Host Pathing Error (3/70h), and
//! with `fast_io_fail_tmo` set, already once the connection has been lost that long (the
//! reconnect goes on; what comes after it runs again). A command without an answer for
//! `io_timeout` counts as a failed connection, as in Linux.
//!
//! Write Zeroes goes the same way: one Write Zeroes command (or, on a target without it,
//! one write of zeroed blocks from a shared zero buffer) after the other, each sent when
//! the one before completes, so a range of any size waits on nothing. Deallocate goes as
//! Dataset Management commands (one range of at most 2^32 - 1 blocks each, one after the
//! other) where the target has them and its deallocated blocks read as zeroes (DLFEAT), as
//! Write Zeroes elsewhere. Nothing here waits for the target.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_model::backend::{Backend, GuestBufferList, GuestBuffers, IoOp, IoRequest, zeroes};
use nvme_spec::opcode::nvm as op;
use nvme_spec::{Status, Submission};

use super::host_identity::HostIdentity;
use super::queue::{Data, HostQueue, QueueError, Unfinished};
use super::session::{self, RemoteNamespace, Session, SessionError, TICK};
use super::url::TcpUrl;

/// A namespace served by a remote NVMe/TCP controller.
#[derive(Debug)]
pub struct TcpBackend {
    url: TcpUrl,
    ns: RemoteNamespace,
    session: Arc<Session>,
    seen_generation: u64,
    /// The I/O queues (connections) now; empty while reconnecting.
    io: Vec<HostQueue>,
    /// Next queue to try first (round robin).
    next: usize,
    /// Accepted, not yet on a connection (no free slot, or reconnecting), in order.
    waiting: VecDeque<Unfinished>,
    /// Finished outside a poll (failures), reported by the next poll.
    done: Vec<(u64, Status)>,
    in_flight: usize,
    failed: bool,
    /// When the connection was lost, while no new one has come.
    lost_at: Option<std::time::Instant>,
    /// Lost longer than `fast_io_fail_tmo`: commands fail until a new connection comes.
    fast_failed: bool,
    checked_tick: u64,
    /// Write Zeroes and Deallocate requests with commands still to send after the one in
    /// flight.
    chains: Vec<Chain>,
    /// Completions of commands of `chains` requests, reused by poll.
    chained: Vec<(u64, Status)>,
    /// The guest memory requests' buffers are in, for transports that reach it directly.
    guest: Option<Arc<device_model::GuestMemory>>,
}

/// A Write Zeroes or Deallocate request going on command after command: the one in flight
/// (or waiting) ends at `at`; the request's range ends at `end`.
#[derive(Debug)]
struct Chain {
    tag: u64,
    at: u64,
    end: u64,
    /// A Deallocate by Dataset Management: the range of its command in flight, that
    /// command's data (kept until it completes, resends included).
    range: Option<Box<[u8; 16]>>,
}

impl TcpBackend {
    /// Connect to `url` (trying each path) and identify its namespace. Fails with every
    /// path's reason when none answers.
    pub fn connect(url: &TcpUrl) -> Result<Self, SessionError> {
        let me = HostIdentity::local();
        let timeout = url
            .kato
            .clamp(Duration::from_secs(1), Duration::from_secs(10));
        // a target busy on every path is asked again for a while: a vnvme target holds a
        // host's new association while its last one (a crashed worker's) has commands left
        let busy_until = Instant::now() + timeout;
        let est = loop {
            match session::establish_any(url, &me, 0, timeout) {
                Ok(est) => break est,
                Err(errs)
                    if errs.iter().all(SessionError::controller_busy)
                        && Instant::now() < busy_until =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(mut errs) => {
                    // the first path's reason, the others logged
                    for e in errs.iter().skip(1) {
                        log::warn!("{}: {e}", url.transport.name());
                    }
                    return Err(errs.swap_remove(0));
                }
            }
        };
        let session = Session::start(url.clone(), me, est.admin, est.path, est.ns)?;
        Ok(Self {
            url: url.clone(),
            ns: est.ns,
            seen_generation: session.generation(),
            session,
            io: est.io,
            next: 0,
            waiting: VecDeque::new(),
            done: Vec::new(),
            in_flight: 0,
            failed: false,
            lost_at: None,
            fast_failed: false,
            checked_tick: 0,
            chains: Vec::new(),
            chained: Vec::new(),
            guest: None,
        })
    }

    /// Requests' buffers are in `mem` (the controller's guest memory): a transport that can
    /// reach them directly does (NVMe/RDMA, through memory windows).
    pub fn set_guest_memory(&mut self, mem: Arc<device_model::GuestMemory>) {
        for q in &mut self.io {
            q.set_guest_memory(&mem);
        }
        self.guest = Some(mem);
    }

    /// The remote namespace.
    pub fn namespace(&self) -> RemoteNamespace {
        self.ns
    }

    /// Reconnects so far.
    pub fn reconnects(&self) -> u64 {
        self.session.reconnects()
    }

    /// I/O queues (connections) up now.
    pub fn io_queues(&self) -> usize {
        self.io.len()
    }

    fn block_size(&self) -> u64 {
        1 << self.ns.lba_shift
    }

    /// An NVM command for `len` bytes at byte `offset`, checked against the namespace.
    fn rw_sqe(&self, opcode: u8, offset: u64, len: u64) -> Result<Submission, Status> {
        let bs = self.block_size();
        if len == 0 || !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(Status::INVALID_FIELD);
        }
        let slba = offset >> self.ns.lba_shift;
        let nlb = len >> self.ns.lba_shift;
        if slba + nlb > self.ns.blocks {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        let mut sqe = Submission::default();
        sqe.opcode = opcode;
        sqe.nsid = self.ns.nsid.into();
        sqe.cdw10 = (slba as u32).into();
        sqe.cdw11 = ((slba >> 32) as u32).into();
        sqe.cdw12 = ((nlb - 1) as u32 & 0xffff).into();
        Ok(sqe)
    }

    /// The next command of a Write Zeroes of the range from `at` to `end`, and how many
    /// bytes it zeroes: Write Zeroes (at most 65536 blocks), or on a target without it a
    /// write of at most `max_transfer` (and [`ZERO_CHUNK`](device_model::backend::ZERO_CHUNK))
    /// bytes of zeroes.
    fn zero_command(&self, at: u64, end: u64) -> Result<(Submission, u64), Status> {
        let bs = self.block_size();
        let (opcode, max) = if self.ns.write_zeroes {
            (op::WRITE_ZEROES, 65536u64 << self.ns.lba_shift)
        } else {
            let max = zeroes().len().min(self.ns.max_transfer) as u64;
            (op::WRITE, max - max % bs)
        };
        if max == 0 {
            return Err(Status::INVALID_FIELD);
        }
        let n = (end - at).min(max);
        Ok((self.rw_sqe(opcode, at, n)?, n))
    }

    /// Send a command of request `tag`: straight onto a connection when nothing waits
    /// before it (no allocation), else behind the waiting ones.
    fn send(&mut self, tag: u64, sqe: Submission, data: Data<'_>) {
        let direct = if self.waiting.is_empty()
            && let Some(k) = self.next_queue()
        {
            let tick = self.session.tick();
            self.io[k].submit(sqe, tag, data, tick).is_ok()
        } else {
            false
        };
        if !direct {
            let (from_c, to_c, bufs) = match data {
                Data::None => (false, false, GuestBuffers::EMPTY),
                Data::FromController(b) => (true, false, b),
                Data::ToController(b) => (false, true, b),
            };
            self.waiting.push_back(Unfinished {
                tag,
                sqe,
                from_controller: from_c,
                to_controller: to_c,
                segs: GuestBufferList::of(bufs),
            });
            self.start_waiting();
        }
    }

    /// Send the Write Zeroes command of request `tag` that starts at `at`; returns where
    /// it ends.
    fn send_zeroes(&mut self, tag: u64, at: u64, end: u64) -> Result<u64, Status> {
        let (sqe, n) = self.zero_command(at, end)?;
        if sqe.opcode == op::WRITE_ZEROES {
            self.send(tag, sqe, Data::None);
        } else {
            let iov = [libc::iovec {
                iov_base: zeroes().as_ptr().cast_mut().cast(),
                iov_len: n as usize,
            }];
            // SAFETY: the zero buffer is static and never freed, and nothing writes it: a
            // queue only reads the buffers of a command that sends data (ToController).
            // The iovec array is copied by the queue (or into the waiting list) here.
            let bufs = unsafe { GuestBuffers::from_raw_iovecs(&iov) };
            self.send(tag, sqe, Data::ToController(bufs));
        }
        Ok(at + n)
    }

    /// Send the Dataset Management command of Deallocate request `tag` whose range goes on
    /// at `at` (at most 2^32 - 1 blocks of it, up to `end`), its range descriptor kept in
    /// `range`; returns where it ends.
    fn send_deallocate(
        &mut self,
        tag: u64,
        at: u64,
        end: u64,
        range: &mut [u8; 16],
    ) -> Result<u64, Status> {
        let shift = self.ns.lba_shift;
        let blocks = ((end - at) >> shift).min(u64::from(u32::MAX));
        if blocks == 0 {
            return Err(Status::INVALID_FIELD);
        }
        // one range: context attributes, length in blocks, starting LBA (§3.2.3)
        *range = [0; 16];
        range[4..8].copy_from_slice(&(blocks as u32).to_le_bytes());
        range[8..16].copy_from_slice(&(at >> shift).to_le_bytes());
        let mut sqe = Submission::default();
        sqe.opcode = op::DATASET_MANAGEMENT;
        sqe.nsid = self.ns.nsid.into();
        sqe.cdw11 = (1u32 << 2).into(); // AD: deallocate; NR 0: one range
        let iov = [libc::iovec {
            iov_base: range.as_mut_ptr().cast(),
            iov_len: range.len(),
        }];
        // SAFETY: `range` is the boxed descriptor of the request's `Chain`, dropped only when
        // the request completes (after this command did, or was given up with the
        // connection); nothing else touches it meanwhile, and a queue only reads the buffers
        // of a command that sends data. The iovec array is copied by the queue (or into the
        // waiting list) here.
        let bufs = unsafe { GuestBuffers::from_raw_iovecs(&iov) };
        self.send(tag, sqe, Data::ToController(bufs));
        Ok(at + (blocks << shift))
    }

    /// Send the next command of chain `i`; returns where it ends.
    fn send_next(&mut self, i: usize) -> Result<u64, Status> {
        let c = &mut self.chains[i];
        let (tag, at, end) = (c.tag, c.at, c.end);
        match c.range.as_deref_mut() {
            Some(range) => {
                let range: *mut [u8; 16] = range;
                // SAFETY: the box stays where it is while `self.chains` changes (only its
                // pointer moves), and nothing else borrows it during this call.
                self.send_deallocate(tag, at, end, unsafe { &mut *range })
            }
            None => self.send_zeroes(tag, at, end),
        }
    }

    /// A command of request `tag` completed with `status`: true when it was one of a Write
    /// Zeroes or Deallocate with more to send, and the next one is on its way (nothing to
    /// report yet).
    fn chain_goes_on(&mut self, tag: u64, status: Status) -> bool {
        let Some(i) = self.chains.iter().position(|c| c.tag == tag) else {
            return false;
        };
        let c = &self.chains[i];
        if status.is_success() && c.at < c.end && !self.failed {
            match self.send_next(i) {
                Ok(at) => {
                    self.chains[i].at = at;
                    return true;
                }
                Err(s) => {
                    log::warn!("{}: Write Zeroes/Deallocate: {s:?}", self.url);
                }
            }
        }
        self.chains.swap_remove(i);
        false
    }

    /// Pick up what the supervisor handed over (one atomic load when nothing changed).
    fn catch_up(&mut self) {
        let g = self.session.generation();
        if g == self.seen_generation {
            return;
        }
        self.seen_generation = g;
        let (fresh, failed) = self.session.take();
        if let Some(qs) = fresh {
            if !self.io.is_empty() {
                self.drop_connection(false);
            }
            log::info!(
                "{} {}: I/O resumes on {} new connection(s) ({} commands to resend)",
                self.url.transport.name(),
                qs.first().map_or("?", HostQueue::peer),
                qs.len(),
                self.waiting.len()
            );
            self.io = qs;
            self.lost_at = None;
            self.fast_failed = false;
            if let Some(mem) = &self.guest {
                for q in &mut self.io {
                    q.set_guest_memory(mem);
                }
            }
            self.checked_tick = self.session.tick();
        }
        if failed {
            self.failed = true;
            self.drop_connection(false);
            for u in self.waiting.drain(..) {
                self.done.push((u.tag, Status::HOST_PATHING_ERROR));
            }
        }
    }

    /// The I/O connections are unusable (one failed: the association is rebuilt, as a
    /// Linux host does): keep their commands for the next ones.
    fn drop_connection(&mut self, report: bool) {
        if self.io.is_empty() {
            return;
        }
        self.lost_at.get_or_insert_with(std::time::Instant::now);
        let mut resend = Vec::new();
        for mut q in self.io.drain(..) {
            q.shutdown();
            let (unfinished, completed) = q.drain();
            for c in completed {
                self.done.push((c.tag, c.status));
            }
            resend.extend(unfinished);
        }
        // oldest first is not known across queues; tags keep them apart
        for u in resend.into_iter().rev() {
            self.waiting.push_front(u);
        }
        if report {
            self.session.report_lost(self.seen_generation);
        }
    }

    fn lost(&mut self, e: &QueueError) {
        log::warn!(
            "{} {}: I/O connection lost: {e}",
            self.url.transport.name(),
            self.io.first().map_or("?", HostQueue::peer)
        );
        self.drop_connection(true);
    }

    /// Lost for `fast_io_fail_tmo`: fail what waits for a connection (and what comes)
    /// until one is back.
    fn check_fast_fail(&mut self) {
        let (Some(tmo), Some(at)) = (self.url.fast_io_fail_tmo, self.lost_at) else {
            return;
        };
        if !self.io.is_empty() || at.elapsed() < tmo {
            return;
        }
        if !self.fast_failed {
            self.fast_failed = true;
            log::warn!(
                "{}: no connection for {tmo:?} (fast_io_fail_tmo): failing {} commands and new ones while reconnecting",
                self.url,
                self.waiting.len()
            );
        }
        for u in self.waiting.drain(..) {
            self.done.push((u.tag, Status::HOST_PATHING_ERROR));
        }
    }

    /// Move waiting commands onto the connection while it has room.
    fn start_waiting(&mut self) {
        let tick = self.session.tick();
        while !self.waiting.is_empty() {
            let Some(k) = self.next_queue() else {
                return;
            };
            let Some(u) = self.waiting.pop_front() else {
                return;
            };
            if self.io[k].submit(u.sqe, u.tag, u.data(), tick).is_err() {
                // only a full queue refuses a command, and `next_queue` found room
                self.waiting.push_front(u);
                return;
            }
        }
    }

    /// The next I/O queue with room (round robin).
    fn next_queue(&mut self) -> Option<usize> {
        let n = self.io.len();
        let k = (0..n)
            .map(|i| (self.next + i) % n)
            .find(|&k| self.io[k].free_slots() > 0)?;
        self.next = (k + 1) % n;
        Some(k)
    }

    /// Commands older than the I/O timeout mean the connection is stuck.
    fn check_timeouts(&mut self) {
        let now = self.session.tick();
        if now == self.checked_tick {
            return;
        }
        self.checked_tick = now;
        let limit = (self.url.io_timeout.as_millis() / TICK.as_millis()) as u64;
        if now > limit
            && self
                .io
                .iter()
                .any(|q| q.older_than(now - limit).next().is_some())
        {
            let e = QueueError::Stream(crate::stream::StreamError::Timeout(
                self.url.io_timeout.as_millis() as u64,
            ));
            self.lost(&e);
        }
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.session.stop();
        for q in &self.io {
            q.shutdown();
        }
    }
}

impl Backend for TcpBackend {
    fn describe(&self) -> String {
        format!("{} ({} MiB)", self.url, self.size() >> 20)
    }

    fn size(&self) -> u64 {
        self.ns.blocks << self.ns.lba_shift
    }

    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        self.catch_up();
        if self.failed || self.fast_failed {
            return Err(Status::HOST_PATHING_ERROR);
        }
        let len = req.iov.len();
        if let IoOp::WriteZeroes { len } | IoOp::Deallocate { len } = req.op {
            let end = req
                .offset
                .checked_add(len)
                .ok_or(Status::LBA_OUT_OF_RANGE)?;
            // checked whole before the first command goes
            self.rw_sqe(op::WRITE, req.offset, len.max(self.block_size()))?;
            let dsm = matches!(req.op, IoOp::Deallocate { .. }) && self.ns.dsm;
            self.chains.push(Chain {
                tag: req.tag,
                at: req.offset,
                end,
                range: dsm.then(|| Box::new([0; 16])),
            });
            // kept until the request completes, even with its only command sent: a DSM
            // range descriptor lives in it
            let i = self.chains.len() - 1;
            match self.send_next(i) {
                Ok(at) => self.chains[i].at = at,
                Err(s) => {
                    self.chains.swap_remove(i);
                    return Err(s);
                }
            }
            self.in_flight += 1;
            return Ok(());
        }
        let (sqe, from_c, to_c) = match req.op {
            IoOp::Read | IoOp::Write { .. } if len as usize > self.ns.max_transfer => {
                log::warn!(
                    "{}: {len}-byte transfer above the target's limit of {}",
                    self.url,
                    self.ns.max_transfer
                );
                return Err(Status::INVALID_FIELD);
            }
            IoOp::Read => (self.rw_sqe(op::READ, req.offset, len)?, true, false),
            IoOp::Write { fua } => {
                let mut sqe = self.rw_sqe(op::WRITE, req.offset, len)?;
                if fua {
                    sqe.cdw12 = (sqe.cdw12.get() | 1 << 30).into();
                }
                (sqe, false, true)
            }
            IoOp::Flush => {
                let mut sqe = Submission::default();
                sqe.opcode = op::FLUSH;
                sqe.nsid = self.ns.nsid.into();
                (sqe, false, false)
            }
            IoOp::WriteZeroes { .. } | IoOp::Deallocate { .. } => {
                return Err(Status::INTERNAL_ERROR); // above
            }
        };
        self.in_flight += 1;
        self.send(req.tag, sqe, Data::of(from_c, to_c, req.iov));
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        self.catch_up();
        self.check_fast_fail();
        let mut n = 0;
        // a command of a Write Zeroes or Deallocate with more to send is held back
        // (`chained`) and decided on below
        let mut chained = std::mem::take(&mut self.chained);
        let chains = &self.chains;
        let mut report = |t: u64, s: Status| {
            if chains.iter().any(|c| c.tag == t) {
                chained.push((t, s));
            } else {
                done(t, s);
                n += 1;
            }
        };
        for (t, s) in self.done.drain(..) {
            report(t, s);
        }
        let mut failed = None;
        for q in &mut self.io {
            if let Err(e) = q.poll(&mut |c| {
                if c.tag != super::queue::SYNC_TAG {
                    report(c.tag, c.status);
                }
            }) {
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            self.lost(&e);
        }
        // commands drained from a lost connection come back through `done` next poll
        for (t, s) in chained.drain(..) {
            if !self.chain_goes_on(t, s) {
                done(t, s);
                n += 1;
            }
        }
        self.chained = chained;
        debug_assert!(n <= self.in_flight, "more completions than commands");
        self.in_flight = self.in_flight.saturating_sub(n);
        self.start_waiting();
        self.check_timeouts();
        n
    }

    fn max_transfer(&self) -> Option<u64> {
        Some(self.ns.max_transfer as u64)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}
