//! A namespace backend on namespace `nsid` of a controller reached through the host driver.
//! Requests go to one I/O queue pair polled from the reactor that owns the backend.
//!
//! Zero copy: every region of the guest memory the front's client mapped into this process
//! is mapped for the backend device too, at its host address (`iova == host`), so the
//! front's host segments are already device addresses and become the backend command's PRPs.
//! The mirror follows the front's DMA map lazily: each request first compares the current
//! map snapshot with the one mirrored (one atomic load) and, if it changed, unmaps the
//! regions that went away and maps the new ones. Requests whose segments the backend cannot
//! express as PRPs, or that touch memory not mirrored, move through a bounce buffer from the
//! driver's DMA memory (which sits above every user-space address), and are counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use device_model::GuestMemory;
use device_model::backend::{Backend, IoOp, IoRequest, iov_len};
use device_model::memory::MemoryMap;
use host_driver::{Controller, DmaBuffer, DriverError, IoQueuePair, Request};
use nvme_spec::Status;

/// How long a synchronous management command may take.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Period of the timeout clock.
const TICK: Duration = Duration::from_millis(100);
/// A request fails after this many ticks without a completion.
const IO_TIMEOUT_TICKS: u32 = 50;
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

/// A namespace on another NVMe controller.
pub struct NvmeBackend {
    ctrl: Controller,
    qp: IoQueuePair,
    nsid: u32,
    block_size: u64,
    size: u64,
    max_transfer: u64,
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// Completions that arrived while a synchronous command was waiting.
    deferred: Vec<(u64, Status)>,
    /// Reused buffer for completions reaped from the queue pair (no allocation per poll).
    reaped: Vec<Request>,
    stats: Arc<TransferStats>,
    /// The front's guest memory, when zero copy is on.
    guest: Option<Arc<GuestMemory>>,
    /// The snapshot last mirrored, and the (host address, length) ranges mapped for the
    /// device, sorted.
    mirrored_snapshot: Option<Arc<MemoryMap>>,
    mirrored: Vec<(u64, u64)>,
    segs: Vec<(u64, u64)>,
    /// Polls since the queue clock last advanced, and when it did.
    polls: u32,
    last_tick: Instant,
    /// The backend device stopped answering: every request fails at once.
    failed: bool,
}

impl std::fmt::Debug for NvmeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeBackend")
            .field("target", &self.ctrl.target())
            .field("nsid", &self.nsid)
            .finish_non_exhaustive()
    }
}

impl NvmeBackend {
    /// Serve namespace `nsid` of `ctrl` (brought up by the caller, its DMA memory at
    /// `host_driver::controller::HIGH_DMA_IOVA_BASE` when `guest` is given). With `guest`,
    /// the front controller's guest memory, data moves zero-copy where it can.
    pub fn new(
        mut ctrl: Controller,
        nsid: u32,
        guest: Option<Arc<GuestMemory>>,
    ) -> Result<Self, DriverError> {
        let ns = ctrl
            .namespaces()
            .iter()
            .find(|n| n.nsid == nsid)
            .cloned()
            .ok_or_else(|| {
                DriverError::Invalid(format!("{}: no active namespace {nsid}", ctrl.target()))
            })?;
        let qsize = QUEUE_SIZE.min(u16::try_from(ctrl.max_queue_size()).unwrap_or(u16::MAX));
        let qp = ctrl.create_io_queue_pair(qsize)?;
        let slots = usize::from(qsize - 1);
        Ok(Self {
            max_transfer: ctrl.max_transfer(),
            ctrl,
            qp,
            nsid,
            block_size: u64::from(ns.block_size),
            size: ns.blocks * u64::from(ns.block_size),
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

    /// Every ~100 ms while requests are in flight: advance the queue clock. When requests
    /// are older than [`IO_TIMEOUT_TICKS`], check the device: gone, fatal or no longer ready
    /// (reset behind our back) fails every request and the backend for good.
    fn check_timeouts(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        self.polls = self.polls.wrapping_add(1);
        if !self.polls.is_multiple_of(1024) || self.last_tick.elapsed() < TICK {
            return 0;
        }
        self.last_tick = Instant::now();
        self.qp.tick();
        let overdue = self.qp.overdue(IO_TIMEOUT_TICKS);
        if overdue.is_empty() {
            return 0;
        }
        if let Err(e) = self.ctrl.check_health() {
            log::error!(
                "{}: backend device failed ({e}); failing its I/O",
                self.ctrl.target()
            );
        } else {
            // alive but slow: keep waiting (failing a request whose command may still
            // complete would let that late completion land on a reused slot)
            log::warn!(
                "{}: {} commands outstanding for over {} s",
                self.ctrl.target(),
                overdue.len(),
                (TICK * IO_TIMEOUT_TICKS).as_secs()
            );
            return 0;
        }
        // the device is gone or unusable: nothing will complete any more
        self.failed = true;
        let mut n = 0;
        for slot in 0..self.pending.len() {
            if let Some(p) = self.pending[slot].take() {
                self.free.push(slot);
                done(p.tag, Status::INTERNAL_ERROR);
                n += 1;
            }
        }
        n
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
            if !wanted.contains(&(va, len))
                && let Err(e) = self.ctrl.unmap_foreign(va, len)
            {
                log::warn!("{}: unmap guest region {va:#x}: {e}", self.ctrl.target());
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
            match self
                .ctrl
                .map_foreign(b.fd, b.file_offset, b.host, key.0, key.1)
            {
                Ok(()) => now.push(key),
                Err(e) => log::warn!(
                    "{}: guest region {:#x}+{:#x} not mirrored, its I/O bounces: {e}",
                    self.ctrl.target(),
                    key.0,
                    key.1
                ),
            }
        }
        now.sort_unstable();
        log::debug!(
            "{}: mirroring {} guest regions",
            self.ctrl.target(),
            now.len()
        );
        self.mirrored = now;
        self.mirrored_snapshot = Some(cur);
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
        self.block_size
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), Status> {
        if !offset.is_multiple_of(self.block_size)
            || !len.is_multiple_of(self.block_size)
            || len == 0
        {
            return Err(Status::INVALID_FIELD);
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
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
        self.ctrl.dma().alloc(len).map_err(|e| {
            log::warn!("{}: {e}", self.ctrl.target());
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
        self.pending[slot] = Some(Pending::bare(u64::MAX));
        if let Err(e) = issue(&mut self.qp, slot as u64) {
            log::warn!("{}: submit: {e}", self.ctrl.target());
            self.pending[slot] = None;
            self.free.push(slot);
            return Err(Status::INTERNAL_ERROR);
        }
        self.wait_sync(slot)
    }

    /// Wait for the command in `slot`, stashing other completions for `poll`.
    fn wait_sync(&mut self, slot: usize) -> Result<(), Status> {
        self.qp.ring();
        let mut next_health_check = Duration::from_millis(100);
        let start = Instant::now();
        loop {
            let mut mine = None;
            let mut got = std::mem::take(&mut self.reaped);
            self.qp.poll(usize::MAX, |r: Request| got.push(r));
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
                log::error!("{}: synchronous command timed out", self.ctrl.target());
                return Err(Status::INTERNAL_ERROR);
            }
            if waited > next_health_check {
                next_health_check = waited + Duration::from_millis(100);
                if let Err(e) = self.ctrl.check_health() {
                    log::error!("{}: backend device failed ({e})", self.ctrl.target());
                    self.failed = true;
                    return Err(Status::INTERNAL_ERROR);
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

    fn lba(&self, offset: u64) -> u64 {
        offset / self.block_size
    }
}

impl Backend for NvmeBackend {
    fn describe(&self) -> String {
        format!("nvme:{}@{}", self.ctrl.target(), self.nsid)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        if self.failed {
            return Err(Status::INTERNAL_ERROR);
        }
        let slot = self.take_slot()?;
        let res = match req.op {
            IoOp::Flush => {
                self.pending[slot] = Some(Pending::bare(req.tag));
                self.qp.flush(self.nsid, slot as u64).map(|_| ())
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
                let blocks = (len / self.block_size) as u32;
                self.sync_mirror();
                if self.guest.is_some() && self.zero_copy_segments(req.iov) {
                    let segs = std::mem::take(&mut self.segs);
                    let r = self.qp.read_write_segments(
                        write,
                        fua,
                        self.nsid,
                        lba,
                        blocks,
                        &segs,
                        slot as u64,
                    );
                    self.segs = segs;
                    if r.is_ok() {
                        self.stats.zero_copy_bytes.fetch_add(len, Ordering::Relaxed);
                        self.pending[slot] = Some(Pending::bare(req.tag));
                        self.qp.ring();
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
                self.qp
                    .read_write_fua(write, fua, self.nsid, lba, blocks, iova, len, slot as u64)
                    .map(|_| ())
            }
        };
        match res {
            Ok(()) => {
                self.qp.ring();
                Ok(())
            }
            Err(e) => {
                log::warn!("{}: submit: {e}", self.ctrl.target());
                self.pending[slot] = None;
                self.free.push(slot);
                Err(Status::INTERNAL_ERROR)
            }
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        let mut n = 0;
        for (tag, st) in self.deferred.drain(..) {
            done(tag, st);
            n += 1;
        }
        let mut got = std::mem::take(&mut self.reaped);
        self.qp.poll(usize::MAX, |r| got.push(r));
        for r in got.drain(..) {
            if let Some((tag, st)) = self.finish(r) {
                done(tag, st);
                n += 1;
            }
        }
        self.reaped = got;
        n + self.check_timeouts(done)
    }

    fn in_flight(&self) -> usize {
        self.pending.len() - self.free.len() + self.deferred.len()
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Status> {
        if self.failed {
            return Err(Status::INTERNAL_ERROR);
        }
        if offset.checked_add(len).is_none_or(|e| e > self.size)
            || !offset.is_multiple_of(self.block_size)
            || !len.is_multiple_of(self.block_size)
        {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        let mut at = offset;
        while at < offset + len {
            // Write Zeroes carries at most 65536 blocks
            let blocks = ((offset + len - at) / self.block_size).min(65536);
            let (nsid, lba) = (self.nsid, self.lba(at));
            self.run_sync(|qp, user| qp.write_zeroes(nsid, lba, blocks as u32, user))?;
            at += blocks * self.block_size;
        }
        Ok(())
    }

    fn read_sync(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Status> {
        if self.failed {
            return Err(Status::INTERNAL_ERROR);
        }
        let len = buf.len() as u64;
        self.check(offset, len)?;
        let bounce = self.dma(len)?;
        let (nsid, lba, iova) = (self.nsid, self.lba(offset), bounce.iova());
        let blocks = (len / self.block_size) as u32;
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
        if self.failed {
            return Err(Status::INTERNAL_ERROR);
        }
        let nsid = self.nsid;
        self.run_sync(|qp, user| qp.flush(nsid, user))
    }
}
