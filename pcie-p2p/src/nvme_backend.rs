//! A namespace backend on namespace `nsid` of a controller reached through the host driver
//! (the whole namespace or an LBA range of it). Requests go to one I/O queue pair of a
//! [`SharedDevice`], polled from the reactor that owns the backend.
//!
//! Zero copy: every region of the guest memory the front's client mapped into this process
//! is mapped for the backend device too, at its host address (`iova == host`), so the
//! front's host segments are already device addresses and become the backend command's PRPs.
//! The mirror follows the front's DMA map lazily: each request first compares the current
//! map snapshot with the one mirrored (one atomic load) and, if it changed, unmaps the
//! regions that went away and maps the new ones. Requests whose segments the backend cannot
//! express as PRPs, or that touch memory not mirrored, move through a bounce buffer from the
//! driver's DMA memory (which sits above every user-space address), and are counted.
//!
//! Faults: a backend with commands outstanding for a tick checks the device; a device that
//! failed or was reset behind our back is reset and brought up again by the shared device,
//! and every backend then fails its outstanding commands with Internal Path Error (which a
//! host retries) and carries on with a new queue pair. A device that cannot be brought back
//! fails every later request at once and its guest mappings are dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use device_model::GuestMemory;
use device_model::backend::{Backend, IoOp, IoRequest, iov_len};
use device_model::memory::MemoryMap;
use host_driver::{DmaBuffer, DriverError, IoQueuePair, Request};
use nvme_spec::Status;

use crate::shared_device::{Claim, FAILED, SharedDevice};

/// How long a synchronous management command may take.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Period of the timeout clock.
const TICK: Duration = Duration::from_millis(100);
/// A healthy device with commands outstanding this many ticks gets a warning.
const SLOW_TICKS: u32 = 50;
/// Tag of a synchronous management command (never handed to the front).
const SYNC_TAG: u64 = u64::MAX;
/// Status of commands lost to a device failure or reset: retryable, path related.
const LOST: Status = Status::INTERNAL_PATH_ERROR;
/// Queue pair depth towards the backend controller.
const QUEUE_SIZE: u16 = 256;

/// Bytes moved per path, shared with the control plane.
#[derive(Debug, Default)]
pub struct TransferStats {
    /// Bytes copied through a bounce buffer.
    pub bounced_bytes: AtomicU64,
    /// Bytes the backend device moved straight to or from guest memory.
    pub zero_copy_bytes: AtomicU64,
}

/// One request in flight on the backend queue pair.
struct Pending {
    tag: u64,
    read: bool,
    /// The guest segments a read's data goes back to.
    iov: Vec<libc::iovec>,
    bounce: Option<DmaBuffer>,
}

// SAFETY: the iovecs point into guest memory kept mapped by the command that owns them
// until its completion is polled, on the same reactor thread.
unsafe impl Send for Pending {}

impl Pending {
    /// A request that moves no data through this backend (flush, zero copy, sync command).
    fn bare(tag: u64) -> Self {
        Self {
            tag,
            read: false,
            iov: Vec::new(),
            bounce: None,
        }
    }
}

/// A namespace (or a range of one) on another NVMe controller.
pub struct NvmeBackend {
    dev: Arc<SharedDevice>,
    /// The device generation `qp` belongs to.
    generation: u64,
    qp: Option<IoQueuePair>,
    /// The namespace, range and block size served.
    claim: Claim,
    max_transfer: u64,
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// Completions that arrived while a synchronous command was waiting, and commands
    /// failed by a device reset, handed out at the next poll.
    deferred: Vec<(u64, Status)>,
    /// Reused buffer for completions reaped from the queue pair (no allocation per poll).
    reaped: Vec<Request>,
    stats: Arc<TransferStats>,
    /// The front's guest memory, when zero copy is on.
    guest: Option<Arc<GuestMemory>>,
    /// The snapshot last mirrored, and the (host address, length) ranges this backend has
    /// mirrored for the device, sorted.
    mirrored_snapshot: Option<Arc<MemoryMap>>,
    mirrored: Vec<(u64, u64)>,
    segs: Vec<(u64, u64)>,
    /// Polls since the queue clock last advanced, and when it did.
    polls: u32,
    last_tick: Instant,
    /// The backend device is gone for good: every request fails at once.
    failed: bool,
}

impl std::fmt::Debug for NvmeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeBackend")
            .field("target", &self.dev.target())
            .field("claim", &self.claim)
            .finish_non_exhaustive()
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
        Ok(Self {
            max_transfer: dev.max_transfer(),
            generation,
            qp: Some(qp),
            claim,
            dev,
            pending: (0..slots).map(|_| None).collect(),
            free: (0..slots).rev().collect(),
            deferred: Vec::new(),
            reaped: Vec::with_capacity(slots),
            stats: Arc::default(),
            guest,
            mirrored_snapshot: None,
            mirrored: Vec::new(),
            segs: Vec::with_capacity(256),
            polls: 0,
            last_tick: Instant::now(),
            failed: false,
        })
    }

    fn qp(&mut self) -> &mut IoQueuePair {
        // present from construction until drop
        self.qp.as_mut().expect("queue pair")
    }

    /// Every ~100 ms while requests are in flight: advance the queue clock; with commands
    /// outstanding for a tick, have the device checked (one register read), and catch up
    /// with a recovery.
    fn check_timeouts(&mut self) {
        self.polls = self.polls.wrapping_add(1);
        if !self.polls.is_multiple_of(1024) || self.last_tick.elapsed() < TICK {
            return;
        }
        self.last_tick = Instant::now();
        self.qp().tick();
        if self.qp().overdue(1).is_empty() {
            return;
        }
        if self.dev.check(self.generation) != self.generation {
            self.catch_up();
            return;
        }
        let slow = self.qp().overdue(SLOW_TICKS).len();
        if slow > 0 && self.polls.is_multiple_of(1024 * 64) {
            // alive but slow: keep waiting (failing a request whose command may still
            // complete would let that late completion land on a reused slot)
            log::warn!(
                "{}: {slow} commands outstanding for over {} s",
                self.dev.target(),
                (TICK * SLOW_TICKS).as_secs()
            );
        }
    }

    /// The device was reset (or given up) since our queue pair was created: the device
    /// will never complete our outstanding commands, so they fail with a retryable status,
    /// and a new queue pair replaces the old one.
    /// Nothing to do (one atomic load) while the generation is unchanged.
    fn catch_up(&mut self) {
        let generation = self.dev.generation();
        if generation == self.generation || self.failed {
            return;
        }
        let mut lost = 0;
        for slot in 0..self.pending.len() {
            if let Some(p) = self.pending[slot].take() {
                self.free.push(slot);
                lost += 1;
                if p.tag != SYNC_TAG {
                    self.deferred.push((p.tag, LOST));
                }
            }
        }
        let claim = self.claim;
        let qp = self.qp.as_mut().expect("queue pair");
        qp.fail_outstanding(LOST, |_| {});
        let res = if generation == FAILED {
            Err(DriverError::Transport("device failed".into()))
        } else {
            self.dev.recreate_queue_pair(qp, &claim)
        };
        match res {
            Ok(g) => {
                log::warn!(
                    "{}: namespace {}: {lost} commands failed by the device reset; new queue pair",
                    self.dev.target(),
                    self.claim.nsid
                );
                self.generation = g;
            }
            Err(e) => {
                log::error!(
                    "{}: namespace {}: {lost} commands failed, backend failed for good: {e}",
                    self.dev.target(),
                    self.claim.nsid
                );
                self.generation = generation;
                self.failed = true;
                self.drop_mirror();
            }
        }
    }

    /// Bring the device's mapping of guest memory in line with the front's DMA map.
    fn sync_mirror(&mut self) {
        let Some(guest) = &self.guest else { return };
        let cur = guest.snapshot();
        if self
            .mirrored_snapshot
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(m, &cur))
        {
            return;
        }
        let wanted: Vec<(u64, u64)> = cur
            .regions()
            .iter()
            .filter_map(|r| r.backing().map(|b| (b.host as u64, b.len)))
            .collect();
        for &(va, len) in &self.mirrored {
            if !wanted.contains(&(va, len)) {
                self.dev.unmirror(va, len);
            }
        }
        let mut now = Vec::with_capacity(wanted.len());
        for r in cur.regions() {
            let Some(b) = r.backing() else { continue };
            let key = (b.host as u64, b.len);
            if self.mirrored.contains(&key) {
                now.push(key);
                continue;
            }
            match self.dev.mirror(b.fd, b.file_offset, b.host, key.1) {
                Ok(()) => now.push(key),
                Err(e) => log::warn!(
                    "{}: guest region {:#x}+{:#x} not mirrored, its I/O bounces: {e}",
                    self.dev.target(),
                    key.0,
                    key.1
                ),
            }
        }
        now.sort_unstable();
        log::debug!(
            "{}: mirroring {} guest regions",
            self.dev.target(),
            now.len()
        );
        self.mirrored = now;
        self.mirrored_snapshot = Some(cur);
    }

    /// Give up this backend's share of the device's guest mappings.
    fn drop_mirror(&mut self) {
        for (va, len) in std::mem::take(&mut self.mirrored) {
            self.dev.unmirror(va, len);
        }
        self.mirrored_snapshot = None;
    }

    /// Device-address segments for `iov` if every byte lies in mirrored memory.
    fn zero_copy_segments(&mut self, iov: &[libc::iovec]) -> bool {
        self.segs.clear();
        for v in iov {
            let (a, l) = (v.iov_base as u64, v.iov_len as u64);
            let i = self.mirrored.partition_point(|&(va, _)| va <= a);
            let inside = i
                .checked_sub(1)
                .map(|i| self.mirrored[i])
                .is_some_and(|(va, len)| a + l <= va + len);
            if !inside {
                return false;
            }
            self.segs.push((a, l));
        }
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

    fn check(&self, offset: u64, len: u64) -> Result<(), Status> {
        if !offset.is_multiple_of(self.claim.block_size)
            || !len.is_multiple_of(self.claim.block_size)
            || len == 0
        {
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

    fn take_slot(&mut self) -> Result<usize, Status> {
        // the front controller never has more commands in flight than a queue's depth, but
        // stay safe if it does: busy is a retryable internal error
        self.free.pop().ok_or(Status::INTERNAL_ERROR)
    }

    fn dma(&self, len: u64) -> Result<DmaBuffer, Status> {
        self.dev.dma().alloc(len).map_err(|e| {
            log::warn!("{}: {e}", self.dev.target());
            Status::INTERNAL_ERROR
        })
    }

    /// Run one management command to completion on a slot of its own; `issue` puts it on
    /// the queue pair. A command that cannot be queued frees its slot again.
    fn run_sync(
        &mut self,
        issue: impl FnOnce(&mut IoQueuePair, u64) -> Result<u16, DriverError>,
    ) -> Result<(), Status> {
        let slot = self.take_slot()?;
        self.pending[slot] = Some(Pending::bare(SYNC_TAG));
        if let Err(e) = issue(self.qp(), slot as u64) {
            log::warn!("{}: submit: {e}", self.dev.target());
            self.pending[slot] = None;
            self.free.push(slot);
            return Err(Status::INTERNAL_ERROR);
        }
        self.wait_sync(slot)
    }

    /// Wait for the command in `slot`, stashing other completions for `poll`.
    fn wait_sync(&mut self, slot: usize) -> Result<(), Status> {
        self.qp().ring();
        let mut next_health_check = Duration::from_millis(100);
        let start = Instant::now();
        loop {
            let mut mine = None;
            let mut got = std::mem::take(&mut self.reaped);
            self.qp().poll(usize::MAX, |r: Request| got.push(r));
            for r in got.drain(..) {
                if r.user == slot as u64 {
                    mine = Some(r.status);
                } else if let Some((tag, st)) = self.finish(r) {
                    self.deferred.push((tag, st));
                }
            }
            self.reaped = got;
            if let Some(s) = mine {
                self.pending[slot] = None;
                self.free.push(slot);
                return if s.is_success() { Ok(()) } else { Err(s) };
            }
            let waited = start.elapsed();
            if waited > SYNC_TIMEOUT {
                log::error!("{}: synchronous command timed out", self.dev.target());
                return Err(Status::INTERNAL_ERROR);
            }
            if waited > next_health_check {
                next_health_check = waited + Duration::from_millis(100);
                if self.dev.check(self.generation) != self.generation {
                    self.catch_up(); // fails this command too
                    return Err(LOST);
                }
            }
            std::hint::spin_loop();
        }
    }

    /// Complete a backend request: copy a read's data back to the guest, free the slot.
    fn finish(&mut self, r: Request) -> Option<(u64, Status)> {
        let slot = usize::try_from(r.user).ok()?;
        let p = self.pending.get_mut(slot)?.take()?;
        self.free.push(slot);
        if p.tag == SYNC_TAG {
            return None; // a synchronous command that gave up waiting
        }
        if p.read
            && r.status.is_success()
            && let Some(b) = &p.bounce
        {
            let mut at = 0usize;
            for v in &p.iov {
                // SAFETY: the guest segment is mapped and writable for this command (see
                // `Pending`); the bounce buffer holds at least the request's length.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        b.as_slice()[at..].as_ptr(),
                        v.iov_base.cast::<u8>(),
                        v.iov_len,
                    );
                }
                at += v.iov_len;
            }
        }
        Some((p.tag, r.status))
    }

    /// Catch up with a device reset; refuse when the device is gone for good.
    fn usable(&mut self) -> Result<(), Status> {
        self.catch_up();
        if self.failed {
            Err(Status::INTERNAL_ERROR)
        } else {
            Ok(())
        }
    }

    /// Device LBA of a byte offset in this backend's range.
    fn lba(&self, offset: u64) -> u64 {
        self.claim.first_lba + offset / self.claim.block_size
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
        self.usable()?;
        let slot = self.take_slot()?;
        let res = match req.op {
            IoOp::Flush => {
                self.pending[slot] = Some(Pending::bare(req.tag));
                let nsid = self.claim.nsid;
                self.qp().flush(nsid, slot as u64).map(|_| ())
            }
            IoOp::Read | IoOp::Write { .. } => {
                let len = iov_len(req.iov);
                if let Err(s) = self.check(req.offset, len) {
                    self.free.push(slot);
                    return Err(s);
                }
                let write = req.op != IoOp::Read;
                let fua = matches!(req.op, IoOp::Write { fua: true });
                let lba = self.lba(req.offset);
                // check() bounds len by the maximum transfer, so the block count fits
                let blocks = (len / self.claim.block_size) as u32;
                self.sync_mirror();
                if self.guest.is_some() && self.zero_copy_segments(req.iov) {
                    let segs = std::mem::take(&mut self.segs);
                    let r = self.qp.as_mut().expect("queue pair").read_write_segments(
                        write,
                        fua,
                        self.claim.nsid,
                        lba,
                        blocks,
                        &segs,
                        slot as u64,
                    );
                    self.segs = segs;
                    if r.is_ok() {
                        self.stats.zero_copy_bytes.fetch_add(len, Ordering::Relaxed);
                        self.pending[slot] = Some(Pending::bare(req.tag));
                        self.qp().ring();
                        return Ok(());
                    }
                }
                let mut buf = match self.dma(len) {
                    Ok(b) => b,
                    Err(s) => {
                        self.free.push(slot);
                        return Err(s);
                    }
                };
                if write {
                    let mut at = 0usize;
                    let dst = buf.as_mut_slice();
                    for v in req.iov {
                        // SAFETY: the guest segment is mapped and readable for this command.
                        let src = unsafe {
                            std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
                        };
                        dst[at..at + v.iov_len].copy_from_slice(src);
                        at += v.iov_len;
                    }
                }
                self.stats.bounced_bytes.fetch_add(len, Ordering::Relaxed);
                let iova = buf.iova();
                self.pending[slot] = Some(Pending {
                    tag: req.tag,
                    read: !write,
                    iov: if write { Vec::new() } else { req.iov.to_vec() },
                    bounce: Some(buf),
                });
                let nsid = self.claim.nsid;
                self.qp()
                    .read_write_fua(write, fua, nsid, lba, blocks, iova, len, slot as u64)
                    .map(|_| ())
            }
        };
        match res {
            Ok(()) => {
                self.qp().ring();
                Ok(())
            }
            Err(e) => {
                log::warn!("{}: submit: {e}", self.dev.target());
                self.pending[slot] = None;
                self.free.push(slot);
                Err(Status::INTERNAL_ERROR)
            }
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        self.catch_up();
        if !self.failed {
            self.check_timeouts();
        }
        let mut n = 0;
        for (tag, st) in self.deferred.drain(..) {
            done(tag, st);
            n += 1;
        }
        let mut got = std::mem::take(&mut self.reaped);
        self.qp().poll(usize::MAX, |r| got.push(r));
        for r in got.drain(..) {
            if let Some((tag, st)) = self.finish(r) {
                done(tag, st);
                n += 1;
            }
        }
        self.reaped = got;
        n
    }

    fn in_flight(&self) -> usize {
        self.pending.len() - self.free.len() + self.deferred.len()
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Status> {
        self.usable()?;
        if offset.checked_add(len).is_none_or(|e| e > self.size())
            || !offset.is_multiple_of(self.claim.block_size)
            || !len.is_multiple_of(self.claim.block_size)
        {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        let mut at = offset;
        while at < offset + len {
            // Write Zeroes carries at most 65536 blocks
            let blocks = ((offset + len - at) / self.claim.block_size).min(65536);
            let (nsid, lba) = (self.claim.nsid, self.lba(at));
            self.run_sync(|qp, user| qp.write_zeroes(nsid, lba, blocks as u32, user))?;
            at += blocks * self.claim.block_size;
        }
        Ok(())
    }

    fn read_sync(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Status> {
        self.usable()?;
        let len = buf.len() as u64;
        self.check(offset, len)?;
        let bounce = self.dma(len)?;
        let (nsid, lba, iova) = (self.claim.nsid, self.lba(offset), bounce.iova());
        let blocks = (len / self.claim.block_size) as u32;
        self.run_sync(|qp, user| qp.read_write(false, nsid, lba, blocks, iova, len, user))?;
        buf.copy_from_slice(&bounce.as_slice()[..buf.len()]);
        Ok(())
    }

    fn guest_memory_changed(&mut self) {
        if !self.failed {
            self.sync_mirror();
        }
    }

    fn flush_sync(&mut self) -> Result<(), Status> {
        self.usable()?;
        let nsid = self.claim.nsid;
        self.run_sync(|qp, user| qp.flush(nsid, user))
    }
}

impl Drop for NvmeBackend {
    fn drop(&mut self) {
        self.drop_mirror();
        if let Some(qp) = self.qp.take() {
            self.dev.delete_queue_pair(qp, self.generation);
        }
        self.dev.release(&self.claim);
    }
}
