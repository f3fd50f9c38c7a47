//! A namespace backend on namespace `nsid` of a controller reached through the host driver
//! (the whole namespace or an LBA range of it). Requests go to one I/O queue pair of a
//! [`SharedDevice`], polled from the reactor that owns the backend.
//!
//! Zero copy: every region of the guest memory the front's client mapped into this process
//! is mapped for the backend device too, at its host address (`iova == host`), so the
//! front's host segments are already device addresses and become the backend command's PRPs.
//! The device's supervisor thread keeps that mirror in line with the front's DMA map and
//! publishes which ranges of which map snapshot the device reaches; each request compares
//! the current snapshot with the published one (a pointer compare). Requests whose segments
//! the backend cannot express as PRPs, or that touch memory not mirrored (yet: a map change
//! the supervisor has not followed), move through a bounce buffer from the driver's DMA
//! memory (which sits above every user-space address), and are counted. Nothing here waits
//! for the device's control path: see `shared_device.rs`.
//!
//! A request in flight is its queue pair slot: the command carries the request's tag, and
//! what a bounced transfer or a Write Zeroes keeps beyond it sits in a table by slot. A
//! request that finds every slot taken (the front may have more commands in flight than the
//! queue pair is deep) waits in order and starts when a completion frees one.
//!
//! Faults: a backend with commands outstanding for a tick asks for a device check; a device
//! that failed or was reset behind our back is reset and brought up again by the shared
//! device's supervisor, and every backend then fails its outstanding commands with Internal
//! Path Error (which a host retries) and carries on with a new queue pair, made by the
//! supervisor (requests in between fail with the same retryable status). A device that
//! cannot be brought back fails every later request at once and its guest mappings are
//! dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use device_model::GuestMemory;
use device_model::backend::{Backend, GuestBufferList, GuestBuffers, IoOp, IoRequest, Submitted};
use device_model::memory::MemoryMap;
use host_driver::{DmaBuffer, DriverError, IoQueuePair, Request};
use nvme_spec::Status;

use crate::shared_device::{Claim, FAILED, Handover, Link, Mirrored, SharedDevice};

/// Period of the timeout clock.
const TICK: Duration = Duration::from_millis(100);
/// A healthy device with commands outstanding this many ticks gets a warning.
const SLOW_TICKS: u32 = 50;
/// Status of commands lost to a device failure or reset: retryable, path related.
const LOST: Status = Status::INTERNAL_PATH_ERROR;
/// Queue pair depth towards the backend controller.
const QUEUE_SIZE: u16 = 256;
/// How long a request may wait (parked, not blocking anything) for the supervisor to
/// mirror a guest DMA map change before it bounces instead.
const PARK_MAX: Duration = Duration::from_millis(20);
/// Requests parked at most; beyond, they bounce at once.
const PARK_SLOTS: usize = 64;
/// How long a request may wait for a queue pair slot: half the front's reset wait, so that a
/// request the front gives up on when its controller resets never starts afterwards. It
/// then fails with the retryable status of a device reset.
const BUSY_MAX: Duration = Duration::from_secs(device_model::quiesce::RESET_WAIT.as_secs() / 2);

/// Bytes moved per path, shared with the control plane.
#[derive(Debug, Default)]
pub struct TransferStats {
    /// Bytes copied through a bounce buffer.
    pub bounced_bytes: AtomicU64,
    /// Bytes the backend device moved straight to or from guest memory.
    pub zero_copy_bytes: AtomicU64,
}

/// What a bounced transfer or a Write Zeroes keeps while its command is in flight, in the
/// table indexed by the command's queue pair slot ([`IoQueuePair::slot_of`]); the request's
/// tag is the command's user value. A zero-copy request or a flush keeps nothing.
enum PendingMore {
    /// The bounce buffer, and for a read the guest segments its data goes back to.
    Bounced {
        buf: DmaBuffer,
        read_into: Option<GuestBufferList>,
    },
    /// A Write Zeroes or Deallocate: where its command on the device ends and where the
    /// range ends (a range of more than 65536 blocks goes as one command after the other,
    /// on this slot); a Deallocate's commands carry Deallocate (DEAC).
    Zeroes { at: u64, end: u64, deallocate: bool },
}

/// A request waiting: for the mirror of a DMA map change (parked, see [`PARK_MAX`]), or for
/// a free queue pair slot (busy, see [`BUSY_MAX`]); `since` is when it began to wait.
struct Waiting {
    tag: u64,
    op: IoOp,
    offset: u64,
    iov: GuestBufferList,
    since: Instant,
}

/// A namespace (or a range of one) on another NVMe controller.
pub struct NvmeBackend {
    dev: Arc<SharedDevice>,
    /// The device generation `qp` belongs to.
    generation: u64,
    /// The queue pair; none while a new one is being made after a reset.
    qp: Option<IoQueuePair>,
    qid: u16,
    qsize: u16,
    /// The namespace, range and block size served.
    claim: Claim,
    max_transfer: u64,
    /// What the commands in flight keep beyond their tag, by queue pair slot.
    more: Vec<Option<Box<PendingMore>>>,
    /// Commands failed by a device reset, handed out at the next poll.
    deferred: Vec<(u64, Status)>,
    /// Reused buffer for the completions of commands that kept more than their tag (no
    /// allocation per poll).
    reaped: Vec<(Request, Box<PendingMore>)>,
    stats: Arc<TransferStats>,
    /// The front's guest memory, watched by the supervisor, when zero copy is on.
    link: Option<Arc<Link>>,
    /// The mirror last published for us, its version, and the snapshot we last asked the
    /// supervisor to look at (as an address, only compared).
    mirrored: Arc<Mirrored>,
    mirrored_version: u64,
    /// The mirrored range the last one-segment request lay in (looked at first).
    mirror_hit: usize,
    poked_for: usize,
    segs: Vec<(u64, u64)>,
    /// Polls so far (every 1024th looks at the timeout clock), and when the clock last
    /// advanced.
    polls: u32,
    last_tick: Instant,
    /// The backend device is gone for good: every request fails at once.
    failed: bool,
    /// Requests waiting for a mirror the supervisor is making.
    parked: Vec<Waiting>,
    /// Requests waiting, in order, for a queue pair slot: the front may have more commands
    /// in flight than the queue pair is deep (a guest's queue of 1,024), and a busy backend
    /// holds them rather than fail them.
    busy: std::collections::VecDeque<Waiting>,
}

impl std::fmt::Debug for NvmeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeBackend")
            .field("target", &self.dev.target())
            .field("claim", &self.claim)
            .finish_non_exhaustive()
    }
}

impl Waiting {
    fn of(req: &IoRequest<'_>) -> Self {
        Self {
            tag: req.tag,
            op: req.op,
            offset: req.offset,
            iov: GuestBufferList::of(req.iov),
            since: Instant::now(),
        }
    }
}

impl NvmeBackend {
    /// Serve namespace `nsid` of `dev`, or the `range` (byte offset, length) of it, on a
    /// queue pair of its own. The device's DMA memory should sit at
    /// `host_driver::controller::HIGH_DMA_IOVA_BASE` when `guest` is given: with `guest`,
    /// the front controller's guest memory, data moves zero-copy where it can.
    pub fn new(
        dev: Arc<SharedDevice>,
        nsid: u32,
        range: Option<(u64, u64)>,
        guest: Option<Arc<GuestMemory>>,
    ) -> Result<Self, DriverError> {
        let claim = dev.claim(nsid, range)?;
        let qsize = QUEUE_SIZE.min(u16::try_from(dev.max_queue_size()).unwrap_or(u16::MAX));
        let (qp, generation) = match dev.create_queue_pair(qsize) {
            Ok(q) => q,
            Err(e) => {
                dev.release(&claim);
                return Err(e);
            }
        };
        let slots = usize::from(qsize - 1);
        let link = guest.map(Link::new);
        if let Some(l) = &link {
            dev.attach(l);
        }
        Ok(Self {
            max_transfer: dev.max_transfer(),
            generation,
            qid: qp.qid(),
            qsize,
            qp: Some(qp),
            claim,
            dev,
            more: (0..slots).map(|_| None).collect(),
            deferred: Vec::new(),
            reaped: Vec::with_capacity(slots),
            stats: Arc::default(),
            link,
            mirrored: Arc::default(),
            mirrored_version: 0,
            mirror_hit: 0,
            poked_for: 0,
            segs: Vec::with_capacity(256),
            polls: 0,
            last_tick: Instant::now(),
            failed: false,
            parked: Vec::new(),
            busy: std::collections::VecDeque::new(),
        })
    }

    fn qp(&mut self) -> &mut IoQueuePair {
        // present from construction until drop
        self.qp.as_mut().expect("queue pair")
    }

    /// Every ~100 ms while requests are in flight (looked at every 1024th poll): advance the
    /// queue clock; with commands outstanding for a tick, ask for a device check (the
    /// supervisor does it; a recovery shows as a new generation at a later poll).
    fn check_timeouts(&mut self) {
        if self.last_tick.elapsed() < TICK {
            return;
        }
        self.last_tick = Instant::now();
        let Some(qp) = self.qp.as_mut() else { return };
        qp.tick();
        if qp.overdue(1).is_empty() {
            return;
        }
        self.dev.request_check(self.generation);
        let slow = qp.overdue(SLOW_TICKS).len();
        if slow > 0 && self.polls.is_multiple_of(1024 * 64) {
            // alive but slow, or the check has not come back: keep waiting (failing a
            // request whose command may still complete would let that late completion land
            // on a reused slot)
            log::warn!(
                "{}: {slow} commands outstanding for over {} s",
                self.dev.target(),
                (TICK * SLOW_TICKS).as_secs()
            );
        }
    }

    /// The device was reset (or given up) since our queue pair was created: the device
    /// will never complete our outstanding commands, so they fail with a retryable status,
    /// and the supervisor makes a new queue pair, picked up here once it is there.
    /// Nothing to do (one atomic load) while the generation is unchanged.
    fn catch_up(&mut self) {
        if self.failed {
            return;
        }
        if self.qp.is_none() {
            match self.dev.take_handover(self.qid) {
                None => return, // still being made
                Some(Handover::Ready(qp, g)) => {
                    log::warn!(
                        "{}: namespace {}: new queue pair after the device reset",
                        self.dev.target(),
                        self.claim.nsid
                    );
                    self.qp = Some(qp);
                    self.generation = g; // reset again since? caught below
                }
                Some(Handover::Failed(e)) => {
                    self.give_up(&e.to_string());
                    return;
                }
            }
        }
        let generation = self.dev.generation();
        if generation == self.generation {
            return;
        }
        let mut lost = 0;
        if let Some(qp) = self.qp.as_mut() {
            let deferred = &mut self.deferred;
            lost = qp.fail_outstanding(LOST, |r| deferred.push((r.user, LOST)));
        }
        self.more.iter_mut().for_each(|m| *m = None);
        log::warn!(
            "{}: namespace {}: {lost} commands failed by the device reset",
            self.dev.target(),
            self.claim.nsid
        );
        if generation == FAILED {
            // the queue pair stays ours (a device that may still be alive keeps its rings)
            self.give_up("device failed");
            return;
        }
        // the queue no longer exists on the device: its rings are free
        self.qp = None;
        self.generation = generation;
        self.dev
            .request_queue_pair(self.qid, self.qsize, self.claim);
    }

    /// The backend device is gone for good: every later request fails at once.
    fn give_up(&mut self, why: &str) {
        log::error!(
            "{}: namespace {}: backend failed for good: {why}",
            self.dev.target(),
            self.claim.nsid
        );
        self.generation = FAILED;
        self.failed = true;
        self.mirrored = Arc::default();
    }

    /// True when the device's published mirror is for `snapshot`, the DMA map a request's
    /// segments were found in (a pointer compare; without one, the front's current map);
    /// else have the supervisor look at the current map (once per snapshot) and bounce
    /// meanwhile.
    fn mirror_current(&mut self, snapshot: Option<&Arc<MemoryMap>>) -> bool {
        // the latest publication first: an older one may cover a map whose regions the
        // supervisor has unmapped since (a request that waited would trust it)
        self.refresh_mirror();
        let Some(link) = &self.link else { return false };
        if snapshot.is_some_and(|s| self.mirrored.covers(s)) {
            return true;
        }
        let cur = link.guest.load();
        let map = snapshot.unwrap_or(&cur);
        if self.mirrored.covers(map) {
            return true;
        }
        let at = Arc::as_ptr(&cur) as usize;
        if self.poked_for != at {
            self.poked_for = at;
            self.dev.poke();
        }
        false
    }

    /// Take the supervisor's latest publication of the mirror if it is newer than ours (one
    /// atomic load when it is not).
    fn refresh_mirror(&mut self) {
        let Some(link) = &self.link else { return };
        let v = link.version.load(Ordering::Acquire);
        if v != self.mirrored_version {
            self.mirrored = link.published();
            self.mirrored_version = v;
        }
    }

    /// Device-address segments for `iov` if every byte lies in mirrored memory (the
    /// caller checked that the mirror is current).
    fn zero_copy_segments(&mut self, iov: GuestBuffers<'_>) -> bool {
        self.segs.clear();
        for (a, l) in iov.segments() {
            let (a, l) = (a as u64, l as u64);
            if !in_mirror(&self.mirrored.ranges, a, l) {
                return false;
            }
            self.segs.push((a, l));
        }
        true
    }

    /// Put a read or write whose data lies in mirrored memory, as device-address `segs`, on
    /// the queue pair (zero copy: its tag is all it keeps). False when the segments are not
    /// expressible as PRPs (the caller bounces), or the queue pair is missing or full.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn start_zero_copy(&mut self, req: &IoRequest<'_>, segs: &[(u64, u64)]) -> bool {
        let len = req.iov.len();
        let write = req.op != IoOp::Read;
        let fua = matches!(req.op, IoOp::Write { fua: true });
        let (nsid, lba) = (self.claim.nsid, self.lba(req.offset));
        // check() bounds len by the maximum transfer, so the block count fits
        let blocks = (len >> self.claim.block_size.trailing_zeros()) as u32;
        let Some(qp) = self.qp.as_mut() else {
            return false;
        };
        let started = match *segs {
            [one] if IoQueuePair::fits_two_pages(one) => qp
                .read_write_two_pages(write, fua, nsid, lba, blocks, one, req.tag)
                .is_ok(),
            _ => qp
                .read_write_segments(write, fua, nsid, lba, blocks, segs, req.tag)
                .is_ok(),
        };
        if !started {
            return false;
        }
        qp.ring();
        self.stats.zero_copy_bytes.fetch_add(len, Ordering::Relaxed);
        true
    }

    /// Transfer counters (shared; read them from any thread).
    pub fn stats(&self) -> Arc<TransferStats> {
        Arc::clone(&self.stats)
    }

    /// Logical block size of the backing namespace.
    pub fn block_size(&self) -> u64 {
        self.claim.block_size
    }

    /// True when `bytes` is a whole number of blocks (the block size is a power of two,
    /// `1 << LBADS`: a mask, not a division per request).
    fn whole_blocks(&self, bytes: u64) -> bool {
        bytes & (self.claim.block_size - 1) == 0
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), Status> {
        if !self.whole_blocks(offset) || !self.whole_blocks(len) || len == 0 {
            return Err(Status::INVALID_FIELD);
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        if len > self.max_transfer {
            return Err(Status::INVALID_FIELD);
        }
        Ok(())
    }

    /// A Write Zeroes range: whole blocks inside the backend's range.
    fn check_zeroes(&self, offset: u64, len: u64) -> Result<(), Status> {
        if offset.checked_add(len).is_none_or(|e| e > self.size())
            || !self.whole_blocks(offset)
            || !self.whole_blocks(len)
        {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        if len == 0 {
            return Err(Status::INVALID_FIELD);
        }
        Ok(())
    }

    /// Put the next Write Zeroes command of request `tag` on the queue pair (at most 65536
    /// blocks, from where its last one ended; with DEAC for a Deallocate), keeping `zeroes`
    /// (its progress) with it.
    fn issue_zeroes(&mut self, tag: u64, mut zeroes: Box<PendingMore>) -> Result<(), DriverError> {
        let bs = self.claim.block_size;
        let PendingMore::Zeroes {
            at,
            end,
            deallocate,
        } = zeroes.as_mut()
        else {
            return Err(DriverError::Invalid("not a Write Zeroes".into()));
        };
        // Write Zeroes carries at most 65536 blocks
        let blocks = ((*end - *at) / bs).min(65536);
        let (from, deallocate) = (*at, *deallocate);
        let (nsid, lba) = (self.claim.nsid, self.lba(from));
        let Some(qp) = self.qp.as_mut() else {
            return Err(DriverError::Invalid("no queue pair".into()));
        };
        let cid = if deallocate {
            qp.write_zeroes_deallocate(nsid, lba, blocks as u32, tag)?
        } else {
            qp.write_zeroes(nsid, lba, blocks as u32, tag)?
        };
        qp.ring();
        *at = from + blocks * bs;
        let slot = usize::from(qp.slot_of(cid));
        self.more[slot] = Some(zeroes);
        Ok(())
    }

    /// Complete a command that kept more than its tag: copy a bounced read's data back to
    /// the guest; a Write Zeroes with more of its range to go sends its next command instead
    /// (`None`).
    fn finish(&mut self, r: Request, more: Box<PendingMore>) -> Option<(u64, Status)> {
        let mut status = r.status;
        let to_go = matches!(*more, PendingMore::Zeroes { at, end, .. } if at < end);
        if to_go && status.is_success() {
            match self.issue_zeroes(r.user, more) {
                Ok(()) => return None,
                Err(e) => {
                    log::warn!("{}: submit: {e}", self.dev.target());
                    status = Status::INTERNAL_ERROR;
                }
            }
        } else if status.is_success()
            && let PendingMore::Bounced {
                buf,
                read_into: Some(iov),
            } = *more
        {
            let len = iov.len() as usize;
            iov.as_buffers().copy_from_slice(&buf.as_slice()[..len]);
        }
        Some((r.user, status))
    }

    /// [`Backend::poll`] for any `done`: [`Backend::poll_into`] pushes each completion without
    /// a call through a closure object.
    fn poll_with(&mut self, mut done: impl FnMut(u64, Status)) -> usize {
        // the common pass, checked inline: a queue pair of the device's generation, and
        // no tick of the timeout clock due
        if self.qp.is_none() || self.generation != self.dev.generation() {
            self.catch_up();
        }
        self.polls = self.polls.wrapping_add(1);
        if !self.failed && self.polls.is_multiple_of(1024) {
            self.check_timeouts();
        }
        if !self.parked.is_empty() {
            self.unpark();
        }
        let mut n = 0;
        if !self.deferred.is_empty() {
            for (tag, st) in self.deferred.drain(..) {
                done(tag, st);
                n += 1;
            }
        }
        let Some(qp) = self.qp.as_mut() else {
            // a new one is being made: what waits for a slot fails as new requests do
            if !self.busy.is_empty() {
                self.start_busy();
            }
            return n;
        };
        // a command that kept nothing but its tag (zero copy, flush) is done at once; the
        // others are finished after the poll
        let mut got = std::mem::take(&mut self.reaped);
        let more = &mut self.more;
        qp.poll(usize::MAX, |r| {
            match more.get_mut(usize::from(r.slot)).and_then(Option::take) {
                None => {
                    done(r.user, r.status);
                    n += 1;
                }
                Some(m) => got.push((r, m)),
            }
        });
        if !got.is_empty() {
            for (r, m) in got.drain(..) {
                if let Some((tag, st)) = self.finish(r, m) {
                    done(tag, st);
                    n += 1;
                }
            }
        }
        self.reaped = got;
        if !self.busy.is_empty() {
            self.start_busy(); // in the slots just freed
        }
        n
    }

    /// Catch up with a device reset; refuse when the device is gone for good, and (with a
    /// retryable status) while the queue pair lost to a reset is being made again.
    fn usable(&mut self) -> Result<(), Status> {
        self.catch_up();
        if self.failed {
            Err(Status::INTERNAL_ERROR)
        } else if self.qp.is_none() {
            Err(LOST)
        } else {
            Ok(())
        }
    }
    /// Start a request on a usable device: zero copy where the mirror allows (`mirrored`:
    /// the mirror is current for the request's memory), bounced else.
    fn start(&mut self, req: &IoRequest<'_>, mirrored: bool) -> Result<(), Status> {
        if !self.qp().can_submit() {
            self.busy.push_back(Waiting::of(req));
            return Ok(());
        }
        let res = match req.op {
            IoOp::Flush => {
                let nsid = self.claim.nsid;
                self.qp().flush(nsid, req.tag).map(|_| ())
            }
            // a Deallocate is a Write Zeroes with DEAC: the device may deallocate, and the
            // blocks read as zeroes whatever its DLFEAT (a Dataset Management would not say)
            IoOp::WriteZeroes { len } | IoOp::Deallocate { len } => {
                self.check_zeroes(req.offset, len)?;
                let zeroes = Box::new(PendingMore::Zeroes {
                    at: req.offset,
                    end: req.offset + len,
                    deallocate: matches!(req.op, IoOp::Deallocate { .. }),
                });
                self.issue_zeroes(req.tag, zeroes)
            }
            IoOp::Read | IoOp::Write { .. } => {
                let len = req.iov.len();
                self.check(req.offset, len)?;
                if mirrored && self.zero_copy_segments(req.iov) {
                    let segs = std::mem::take(&mut self.segs);
                    let started = self.start_zero_copy(req, &segs);
                    self.segs = segs;
                    if started {
                        return Ok(());
                    }
                }
                self.start_bounced(req, len)
            }
        };
        match res {
            Ok(()) => {
                self.qp().ring();
                Ok(())
            }
            Err(e) => {
                log::warn!("{}: submit: {e}", self.dev.target());
                Err(Status::INTERNAL_ERROR)
            }
        }
    }

    /// A read or write of `len` bytes through a bounce buffer from the driver's DMA memory.
    fn start_bounced(&mut self, req: &IoRequest<'_>, len: u64) -> Result<(), DriverError> {
        let write = req.op != IoOp::Read;
        let fua = matches!(req.op, IoOp::Write { fua: true });
        let lba = self.lba(req.offset);
        // check() bounds len by the maximum transfer, so the block count fits
        let blocks = (len >> self.claim.block_size.trailing_zeros()) as u32;
        let mut buf = self.dev.dma().alloc(len)?;
        if write {
            req.iov
                .copy_to_slice(&mut buf.as_mut_slice()[..len as usize]);
        }
        let (iova, nsid) = (buf.iova(), self.claim.nsid);
        let qp = self.qp();
        let cid = qp.read_write_fua(write, fua, nsid, lba, blocks, iova, len, req.tag)?;
        let slot = usize::from(qp.slot_of(cid));
        self.stats.bounced_bytes.fetch_add(len, Ordering::Relaxed);
        self.more[slot] = Some(Box::new(PendingMore::Bounced {
            buf,
            read_into: (!write).then(|| GuestBufferList::of(req.iov)),
        }));
        Ok(())
    }

    /// The common request in few steps: a read or write of one segment (a 4 KiB I/O), on a
    /// device in its current generation, in memory the published mirror covers. `None`
    /// when the request is not that: [`Backend::submit`]'s general path takes it (it
    /// catches up with resets, parks, bounces, builds PRP lists).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn start_one_segment(&mut self, req: &IoRequest<'_>) -> Option<Result<(), Status>> {
        if !matches!(req.op, IoOp::Read | IoOp::Write { .. }) {
            return None;
        }
        let mut segments = req.iov.segments();
        let (Some((addr, len)), 0) = (segments.next(), segments.len()) else {
            return None;
        };
        let (addr, len) = (addr as u64, len as u64);
        let snapshot = req.iov.snapshot()?;
        if self.failed
            || self.qp.is_none()
            || self.generation != self.dev.generation()
            || !self.mirrored.covers(snapshot)
        {
            return None;
        }
        if !self.in_mirror_hit(addr, len) {
            return None;
        }
        if let Err(s) = self.check(req.offset, len) {
            return Some(Err(s));
        }
        if self.start_zero_copy(req, &[(addr, len)]) {
            return Some(Ok(()));
        }
        // not expressible in PRPs after all, or the queue pair is full: the general path
        // bounces it, or holds it until a slot frees
        None
    }

    /// [`in_mirror`] looking first at the range the last request lay in (a guest's buffers
    /// mostly lie in one of its few regions).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn in_mirror_hit(&mut self, addr: u64, len: u64) -> bool {
        in_mirror_hinted(&self.mirrored.ranges, &mut self.mirror_hit, addr, len)
    }

    /// Start the parked requests once the mirror is there, or their time is up.
    fn unpark(&mut self) {
        let ready = self.mirror_current(None) || !self.dev.mirror_coming(PARK_MAX);
        let mut parked = std::mem::take(&mut self.parked);
        parked.retain(|p| {
            if !ready && p.since.elapsed() < PARK_MAX {
                return true;
            }
            self.restart(p);
            false
        });
        self.parked = parked;
    }

    /// Start the requests waiting for a queue pair slot, in order, while there are free
    /// slots (without a queue pair, they fail as new requests do); fail those that waited
    /// [`BUSY_MAX`].
    fn start_busy(&mut self) {
        let mut expired = 0;
        while self
            .busy
            .front()
            .is_some_and(|w| w.since.elapsed() >= BUSY_MAX)
        {
            if let Some(w) = self.busy.pop_front() {
                self.deferred.push((w.tag, LOST));
                expired += 1;
            }
        }
        if expired > 0 {
            device_model::warn_limited!(
                "{}: namespace {}: {expired} requests waited {BUSY_MAX:?} for a queue slot: failed (retryable)",
                self.dev.target(),
                self.claim.nsid
            );
        }
        while self.qp.as_ref().is_none_or(IoQueuePair::can_submit)
            && let Some(w) = self.busy.pop_front()
        {
            self.restart(&w);
        }
    }

    /// Start a request that waited (parked or busy); a refusal is handed out at the next
    /// poll.
    fn restart(&mut self, p: &Waiting) {
        let req = IoRequest {
            tag: p.tag,
            op: p.op,
            offset: p.offset,
            iov: p.iov.as_buffers(),
        };
        let started = self.usable().and_then(|()| {
            let mirrored = self.mirror_current(req.iov.snapshot());
            self.start(&req, mirrored)
        });
        if let Err(st) = started {
            self.deferred.push((p.tag, st));
        }
    }

    /// Device LBA of a byte offset in this backend's range.
    fn lba(&self, offset: u64) -> u64 {
        self.claim.first_lba + (offset >> self.claim.block_size.trailing_zeros())
    }

    /// Start `req` (see [`Backend::submit`]). Inlined, with the one-segment start, the
    /// mirror check and the queue pair's submission, into [`Backend::execute`], the
    /// controller's call: the forwarding hop's start went 316 -> 208 instructions per command
    /// (callgrind), most of it the calls and their register saves.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn submit_request(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        if !self.busy.is_empty() {
            // behind the requests already waiting for a slot
            self.busy.push_back(Waiting::of(req));
            return Ok(());
        }
        if let Some(started) = self.start_one_segment(req) {
            return started;
        }
        self.usable()?;
        let moves_data = matches!(req.op, IoOp::Read | IoOp::Write { .. });
        let mirrored = moves_data && self.mirror_current(req.iov.snapshot());
        if moves_data
            && !mirrored
            && self.link.is_some()
            && self.parked.len() < PARK_SLOTS
            && self.dev.mirror_coming(PARK_MAX)
        {
            // the front's DMA map changed and the supervisor is at it: give it a moment
            // (this request waits; the reactor does not), rather than bounce at once
            self.parked.push(Waiting::of(req));
            return Ok(());
        }
        self.start(req, mirrored)
    }
}

/// True when `len` bytes at host address `addr` lie inside one of the mirrored `ranges`
/// (`(host address, length)`, sorted).
#[inline]
fn in_mirror(ranges: &[(u64, u64)], addr: u64, len: u64) -> bool {
    let i = ranges.partition_point(|&(va, _)| va <= addr);
    i.checked_sub(1)
        .is_some_and(|i| inside(ranges[i], addr, len))
}

/// [`in_mirror`], looking first at range `hint` (which may be past the end, or a range of an
/// earlier publication's numbering: only a hint) and leaving there the range found.
#[allow(clippy::inline_always)]
#[inline(always)]
fn in_mirror_hinted(ranges: &[(u64, u64)], hint: &mut usize, addr: u64, len: u64) -> bool {
    if ranges.get(*hint).is_some_and(|&r| inside(r, addr, len)) {
        return true;
    }
    let i = ranges.partition_point(|&(va, _)| va <= addr);
    match i.checked_sub(1) {
        Some(i) if inside(ranges[i], addr, len) => {
            *hint = i;
            true
        }
        _ => false,
    }
}

/// True when `[addr, addr + len)` lies inside range `(va, l)` (no sum may wrap).
#[inline]
fn inside((va, l): (u64, u64), addr: u64, len: u64) -> bool {
    match (addr.checked_add(len), va.checked_add(l)) {
        (Some(end), Some(top)) => addr >= va && end <= top,
        _ => false,
    }
}

impl Backend for NvmeBackend {
    fn describe(&self) -> String {
        let c = &self.claim;
        format!(
            "nvme:{}@{} blocks {}..{}",
            self.dev.target(),
            self.claim.nsid,
            c.first_lba,
            c.first_lba + c.blocks
        )
    }

    fn size(&self) -> u64 {
        self.claim.blocks * self.claim.block_size
    }

    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        self.submit_request(req)
    }

    /// [`submit`](Self::submit), with its body in the controller's call (one call less per
    /// command).
    fn execute(&mut self, req: &IoRequest<'_>) -> Result<Submitted, Status> {
        self.submit_request(req).map(|()| Submitted::Queued)
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        self.poll_with(done)
    }

    fn poll_into(&mut self, done: &mut Vec<(u64, Status)>) -> usize {
        self.poll_with(|t, s| done.push((t, s)))
    }

    fn max_transfer(&self) -> Option<u64> {
        Some(self.max_transfer)
    }

    fn in_flight(&self) -> usize {
        self.qp.as_ref().map_or(0, IoQueuePair::outstanding)
            + self.deferred.len()
            + self.parked.len()
            + self.busy.len()
    }

    fn guest_memory_changed(&mut self) {
        if !self.failed && self.link.is_some() {
            self.dev.poke(); // the supervisor follows; nothing here waits for the device
        }
    }

    fn use_guest_memory(&mut self, guest: &Arc<GuestMemory>) {
        if self
            .link
            .as_ref()
            .is_some_and(|l| Arc::ptr_eq(&l.guest, guest))
        {
            return;
        }
        if let Some(old) = self.link.take() {
            self.dev.detach(&old);
        }
        let link = Link::new(Arc::clone(guest));
        self.dev.attach(&link);
        self.link = Some(link);
        // nothing published for the new memory yet: requests bounce until it is
        self.mirrored = Arc::default();
        self.mirrored_version = 0;
        self.poked_for = 0;
    }
}

impl Drop for NvmeBackend {
    fn drop(&mut self) {
        if let Some(l) = self.link.take() {
            self.dev.detach(&l);
        }
        // deleted (or, after a reset, just dropped) by the supervisor: nothing here waits
        let qp = self.qp.take().map(|qp| (qp, self.generation));
        self.dev.delete_queue_pair(self.qid, qp);
        self.dev.release(&self.claim);
    }
}

#[cfg(test)]
mod tests {
    use super::{in_mirror, in_mirror_hinted};

    /// The hinted check answers as the plain one whatever its hint: one left by a request
    /// in another range, past the end of a newer, shorter publication, or at a range of
    /// another numbering. A wrong "true" would let the device DMA outside the mirror.
    #[test]
    fn the_mirror_hint_never_changes_the_answer() {
        let first = [(0x1000, 0x1000), (0x3000, 0x1000), (0x5000, 0x1000)];
        let shorter = [(0x1000, 0x1000)];
        let renumbered = [(0x1000, 0x1000), (0x3000, 0x1000), (0x9000, 0x1000)];
        let edge = [(u64::MAX - 0xfff, 0x1000)];
        let asks = [
            (0x5100, 0x200),
            (0x5f00, 0x100),
            (0x5f00, 0x101),
            (0x4f00, 0x200),
            (0x9100, 0x200),
            (0x1000, 0x1000),
            (0x0, 0x10),
            (0x2000, 0x1000),
            (u64::MAX - 0x10, 0x10),
            (u64::MAX - 0x10, 0x20),
        ];
        for ranges in [&first[..], &shorter, &renumbered, &edge, &[]] {
            for hint in 0..4 {
                for &(addr, len) in &asks {
                    let mut h = hint;
                    assert_eq!(
                        in_mirror_hinted(ranges, &mut h, addr, len),
                        in_mirror(ranges, addr, len),
                        "{ranges:x?} hint {hint} {addr:#x}+{len:#x}"
                    );
                }
            }
        }
        // the hint follows the hits, and a stale one past the end is harmless
        let mut h = 0;
        assert!(in_mirror_hinted(&first, &mut h, 0x5100, 0x200));
        assert_eq!(h, 2);
        assert!(!in_mirror_hinted(&shorter, &mut h, 0x5100, 0x200));
        assert!(!in_mirror_hinted(&renumbered, &mut h, 0x5100, 0x200));
        assert!(in_mirror_hinted(&renumbered, &mut h, 0x9100, 0x200));
        assert!(
            !in_mirror_hinted(&edge, &mut h, u64::MAX - 0x10, 0x20),
            "wraps"
        );
    }
}
