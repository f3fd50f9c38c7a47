//! [`TcpBackend`]: a namespace backend on a remote NVMe/TCP namespace. Its I/O queue's
//! connection is driven from the reactor that polls the front controller (non-blocking
//! sends and receives, no thread per connection); the admin queue and reconnects belong to
//! the session's supervisor thread.
//!
//! Commands in flight when the connection fails are kept and submitted again on the next
//! connection (a read reads again, a write writes the same data again: both idempotent);
//! past the controller loss timeout they complete with Host Pathing Error (3/70h). A
//! command without an answer for `io_timeout` counts as a failed connection, as in Linux.
//!
//! Write Zeroes goes the same way: one Write Zeroes command (or, on a target without it,
//! one write of zeroed blocks from a shared zero buffer) after the other, each sent when
//! the one before completes, so a range of any size waits on nothing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use device_model::backend::{Backend, GuestBufferList, GuestBuffers, IoOp, IoRequest, zeroes};
use nvme_spec::opcode::nvm as op;
use nvme_spec::{Status, Submission};

use super::host_identity::HostIdentity;
use super::queue::{Completed, Data, HostQueue, QueueError, SyncData, Unfinished};
use super::session::{self, NamespaceInfo, Session, SessionError, TICK};
use super::url::TcpUrl;

/// A namespace served by a remote NVMe/TCP controller.
#[derive(Debug)]
pub struct TcpBackend {
    url: TcpUrl,
    ns: NamespaceInfo,
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
    checked_tick: u64,
    timeout: Duration,
    /// Write Zeroes requests with commands still to send after the one in flight.
    zeroing: Vec<Zeroing>,
    /// Completions of commands of `zeroing` requests, reused by poll.
    chained: Vec<(u64, Status)>,
}

/// A Write Zeroes request going on command after command: the one in flight (or waiting)
/// ends at `at`; the request's range ends at `end`.
#[derive(Clone, Copy, Debug)]
struct Zeroing {
    tag: u64,
    at: u64,
    end: u64,
}

impl TcpBackend {
    /// Connect to `url` (trying each path) and identify its namespace. Fails with every
    /// path's reason when none answers.
    pub fn connect(url: &TcpUrl) -> Result<Self, SessionError> {
        let me = HostIdentity::local();
        let timeout = url
            .kato
            .clamp(Duration::from_secs(1), Duration::from_secs(10));
        let est = session::establish_any(url, &me, 0, timeout).map_err(|mut errs| {
            // the first path's reason, the others logged
            for e in errs.iter().skip(1) {
                log::warn!("nvme-tcp: {e}");
            }
            errs.swap_remove(0)
        })?;
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
            checked_tick: 0,
            timeout,
            zeroing: Vec::new(),
            chained: Vec::new(),
        })
    }

    /// The remote namespace.
    pub fn namespace(&self) -> NamespaceInfo {
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

    /// A command of request `tag` completed with `status`: true when it was one of a Write
    /// Zeroes with more to send, and the next one is on its way (nothing to report yet).
    fn zeroes_go_on(&mut self, tag: u64, status: Status) -> bool {
        let Some(i) = self.zeroing.iter().position(|z| z.tag == tag) else {
            return false;
        };
        let z = self.zeroing[i];
        if status.is_success() && z.at < z.end && !self.failed {
            match self.send_zeroes(tag, z.at, z.end) {
                Ok(at) => {
                    self.zeroing[i].at = at;
                    return true;
                }
                Err(s) => {
                    log::warn!("nvme-tcp {}: Write Zeroes: {s:?}", self.url);
                }
            }
        }
        self.zeroing.swap_remove(i);
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
                "nvme-tcp {}: I/O resumes on {} new connection(s) ({} commands to resend)",
                qs.first().map_or("?", HostQueue::peer),
                qs.len(),
                self.waiting.len()
            );
            self.io = qs;
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
            "nvme-tcp {}: I/O connection lost: {e}",
            self.io.first().map_or("?", HostQueue::peer)
        );
        self.drop_connection(true);
    }

    /// Move waiting commands onto the connection while it has room (one slot stays free
    /// for the synchronous commands).
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
                // only a full queue refuses a command, and one slot is always kept free
                self.waiting.push_front(u);
                return;
            }
        }
    }

    /// The next I/O queue with room (round robin; one slot stays free for synchronous
    /// commands).
    fn next_queue(&mut self) -> Option<usize> {
        let n = self.io.len();
        let k = (0..n)
            .map(|i| (self.next + i) % n)
            .find(|&k| self.io[k].free_slots() > 1)?;
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

    /// Run one command synchronously on the I/O queue (Format's zeroing, DSM, Compare
    /// reads, flushes at shutdown).
    fn sync(&mut self, sqe: Submission, data: SyncData<'_>) -> Result<(), Status> {
        self.catch_up();
        if self.failed {
            return Err(Status::HOST_PATHING_ERROR);
        }
        let Some(q) = self.io.first_mut() else {
            return Err(Status::TRANSIENT_TRANSPORT_ERROR);
        };
        match q.sync(sqe, data, self.timeout) {
            Ok(Completed { status, .. }) if status.is_success() => Ok(()),
            Ok(Completed { status, .. }) => Err(status),
            Err(e) => {
                self.lost(&e);
                Err(Status::TRANSIENT_TRANSPORT_ERROR)
            }
        }
    }

    fn zero_range(&mut self, opcode: u8, offset: u64, len: u64) -> Result<(), Status> {
        // Write Zeroes carries at most 65536 blocks per command
        let max = 65536u64 << self.ns.lba_shift;
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(max);
            let sqe = self.rw_sqe(opcode, at, n)?;
            self.sync(sqe, SyncData::None)?;
            at += n;
        }
        Ok(())
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
        if self.failed {
            return Err(Status::HOST_PATHING_ERROR);
        }
        let len = req.iov.len();
        if let IoOp::WriteZeroes { len } = req.op {
            let end = req
                .offset
                .checked_add(len)
                .ok_or(Status::LBA_OUT_OF_RANGE)?;
            // checked whole before the first command goes
            self.rw_sqe(op::WRITE, req.offset, len.max(self.block_size()))?;
            let at = self.send_zeroes(req.tag, req.offset, end)?;
            self.in_flight += 1;
            if at < end {
                self.zeroing.push(Zeroing {
                    tag: req.tag,
                    at,
                    end,
                });
            }
            return Ok(());
        }
        let (sqe, from_c, to_c) = match req.op {
            IoOp::Read | IoOp::Write { .. } if len as usize > self.ns.max_transfer => {
                log::warn!(
                    "nvme-tcp {}: {len}-byte transfer above the target's limit of {}",
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
            IoOp::WriteZeroes { .. } => return Err(Status::INTERNAL_ERROR), // above
        };
        self.in_flight += 1;
        self.send(req.tag, sqe, Data::of(from_c, to_c, req.iov));
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        self.catch_up();
        let mut n = 0;
        // a command of a Write Zeroes with more to send is held back (`chained`) and
        // decided on below
        let mut chained = std::mem::take(&mut self.chained);
        let zeroing = &self.zeroing;
        let mut report = |t: u64, s: Status| {
            if zeroing.iter().any(|z| z.tag == t) {
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
            if !self.zeroes_go_on(t, s) {
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

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Status> {
        if self.ns.write_zeroes {
            return self.zero_range(op::WRITE_ZEROES, offset, len);
        }
        // no Write Zeroes on the target: write zeroed blocks
        let zero = vec![0u8; (1 << 20).min(self.ns.max_transfer)];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zero.len() as u64);
            let sqe = self.rw_sqe(op::WRITE, at, n)?;
            self.sync(sqe, SyncData::ToController(&zero[..n as usize]))?;
            at += n;
        }
        Ok(())
    }

    fn deallocate(&mut self, offset: u64, len: u64) -> Result<(), Status> {
        if !self.ns.dsm {
            return self.write_zeroes(offset, len);
        }
        let bs = self.block_size();
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(Status::INVALID_FIELD);
        }
        let max = u64::from(u32::MAX) << self.ns.lba_shift;
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(max);
            // one range: context attributes, length in blocks, starting LBA (§3.2.3)
            let mut range = [0u8; 16];
            range[4..8].copy_from_slice(&((n >> self.ns.lba_shift) as u32).to_le_bytes());
            range[8..16].copy_from_slice(&(at >> self.ns.lba_shift).to_le_bytes());
            let mut sqe = Submission::default();
            sqe.opcode = op::DATASET_MANAGEMENT;
            sqe.nsid = self.ns.nsid.into();
            sqe.cdw11 = (1u32 << 2).into();
            self.sync(sqe, SyncData::ToController(&range))?;
            at += n;
        }
        Ok(())
    }

    fn read_sync(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Status> {
        let sqe = self.rw_sqe(op::READ, offset, buf.len() as u64)?;
        self.sync(sqe, SyncData::FromController(buf))
    }

    fn flush_sync(&mut self) -> Result<(), Status> {
        let mut sqe = Submission::default();
        sqe.opcode = op::FLUSH;
        sqe.nsid = self.ns.nsid.into();
        self.sync(sqe, SyncData::None)
    }
}
