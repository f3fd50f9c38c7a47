//! One backend NVMe controller shared by every namespace backend that uses it: one SSD can
//! back several emulated namespaces (whole namespaces or LBA ranges of one) on different
//! front controllers, each served by its own reactor thread with its own I/O queue pair.
//!
//! The hot path touches only the backend's own queue pair; the controller (admin queue,
//! DMA mappings, range claims) sits behind a mutex taken for set-up, mirror changes, the
//! periodic health check and recovery. A recovery reset bumps a generation counter that
//! every backend compares (one atomic load) before it submits or polls: a backend that sees
//! it change fails its outstanding commands and re-creates its queue pair on the same queue
//! id, so a backend that has not caught up yet never rings a queue handed to another.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use host_driver::{Controller, DmaMemory, DriverError, IoQueuePair};

/// Generation of a device given up for good (reset failed, device gone).
pub const FAILED: u64 = u64::MAX;

/// A range of a namespace handed to one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    pub nsid: u32,
    pub first_lba: u64,
    pub blocks: u64,
    pub block_size: u64,
}

impl Claim {
    fn end(&self) -> u64 {
        self.first_lba + self.blocks
    }

    fn overlaps(&self, o: &Claim) -> bool {
        self.nsid == o.nsid && self.first_lba < o.end() && o.first_lba < self.end()
    }
}

struct DeviceState {
    ctrl: Controller,
    /// Guest regions mirrored for the device, `(iova == host address, len)` -> users.
    mirrors: HashMap<(u64, u64), usize>,
    claims: Vec<Claim>,
    /// Queue ids owned by a backend, kept across recovery resets.
    qids: BTreeSet<u16>,
}

/// A backend controller shared by namespace backends.
pub struct SharedDevice {
    state: Mutex<DeviceState>,
    generation: AtomicU64,
    target: String,
    dma: Arc<DmaMemory>,
    max_transfer: u64,
    max_queue_size: u32,
}

impl std::fmt::Debug for SharedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDevice")
            .field("target", &self.target)
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl SharedDevice {
    /// Share `ctrl` (brought up by the caller with as many I/O queues as backends will use).
    pub fn new(ctrl: Controller) -> Arc<Self> {
        Arc::new(Self {
            target: ctrl.target(),
            dma: Arc::clone(ctrl.dma()),
            max_transfer: ctrl.max_transfer(),
            max_queue_size: ctrl.max_queue_size(),
            state: Mutex::new(DeviceState {
                ctrl,
                mirrors: HashMap::new(),
                claims: Vec::new(),
                qids: BTreeSet::new(),
            }),
            generation: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, DeviceState> {
        // a backend that panicked left the state consistent: every change is one call
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The transport's target name.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The driver's DMA memory (bounce buffers).
    pub fn dma(&self) -> &Arc<DmaMemory> {
        &self.dma
    }

    /// Largest transfer in bytes.
    pub fn max_transfer(&self) -> u64 {
        self.max_transfer
    }

    /// Largest queue size (CAP.MQES + 1).
    pub fn max_queue_size(&self) -> u32 {
        self.max_queue_size
    }

    /// Recovery resets so far, or [`FAILED`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Hand out `range` (byte offset and length; the whole namespace when `None`) of
    /// namespace `nsid`. Refused when the namespace is not active, the range is not
    /// block-aligned or runs past the end, or it overlaps a range already handed out.
    pub fn claim(&self, nsid: u32, range: Option<(u64, u64)>) -> Result<Claim, DriverError> {
        let mut st = self.lock();
        let ns = st
            .ctrl
            .namespaces()
            .iter()
            .find(|n| n.nsid == nsid)
            .ok_or_else(|| {
                DriverError::Invalid(format!("{}: no active namespace {nsid}", self.target))
            })?;
        let bs = u64::from(ns.block_size);
        let total = ns.blocks * bs;
        let (offset, len) = range.unwrap_or((0, total));
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) || len == 0 {
            return Err(DriverError::Invalid(format!(
                "{}: namespace {nsid}: range {offset}+{len} is not a non-empty multiple of its {bs}-byte blocks",
                self.target
            )));
        }
        if offset.checked_add(len).is_none_or(|end| end > total) {
            return Err(DriverError::Invalid(format!(
                "{}: namespace {nsid}: range {offset}+{len} runs past its end ({total} bytes)",
                self.target
            )));
        }
        let claim = Claim {
            nsid,
            first_lba: offset / bs,
            blocks: len / bs,
            block_size: bs,
        };
        if let Some(o) = st.claims.iter().find(|c| c.overlaps(&claim)) {
            return Err(DriverError::Invalid(format!(
                "{}: namespace {nsid}: blocks {}..{} overlap blocks {}..{} already in use",
                self.target,
                claim.first_lba,
                claim.end(),
                o.first_lba,
                o.end()
            )));
        }
        st.claims.push(claim);
        Ok(claim)
    }

    /// Give a range back.
    pub fn release(&self, claim: &Claim) {
        self.lock().claims.retain(|c| c != claim);
    }

    /// Create a queue pair for one backend, on a queue id no other backend owns; returns
    /// it with the generation it belongs to.
    pub fn create_queue_pair(&self, size: u16) -> Result<(IoQueuePair, u64), DriverError> {
        let mut st = self.lock();
        let count = st.ctrl.io_queue_count();
        let qid = (1..=count).find(|q| !st.qids.contains(q)).ok_or_else(|| {
            DriverError::Invalid(format!(
                "{}: all {count} I/O queues in use (one per namespace backend)",
                self.target
            ))
        })?;
        let qp = st.ctrl.create_io_queue_pair_at(qid, size)?;
        st.qids.insert(qid);
        Ok((qp, self.generation()))
    }

    /// Delete a backend's queue pair (created in generation `generation`).
    pub fn delete_queue_pair(&self, qp: IoQueuePair, generation: u64) {
        let mut st = self.lock();
        st.qids.remove(&qp.qid());
        // after a reset since, the queue no longer exists on the controller
        if generation == self.generation()
            && generation != FAILED
            && let Err(e) = st.ctrl.delete_io_queue_pair(qp)
        {
            log::warn!("{}: delete queue pair: {e}", self.target);
        }
    }

    /// After a recovery reset, create `qp` again on its queue id and check that `claim`
    /// still fits its namespace. Returns the generation `qp` now belongs to.
    pub fn recreate_queue_pair(
        &self,
        qp: &mut IoQueuePair,
        claim: &Claim,
    ) -> Result<u64, DriverError> {
        let mut st = self.lock();
        let generation = self.generation();
        if generation == FAILED {
            return Err(DriverError::Transport(format!(
                "{}: device failed",
                self.target
            )));
        }
        let fits = st.ctrl.namespaces().iter().any(|n| {
            n.nsid == claim.nsid
                && u64::from(n.block_size) == claim.block_size
                && n.blocks >= claim.end()
        });
        if !fits {
            return Err(DriverError::Invalid(format!(
                "{}: namespace {} changed across the reset",
                self.target, claim.nsid
            )));
        }
        st.ctrl.recreate_io_queue_pair(qp)?;
        Ok(generation)
    }

    /// Let the device reach `len` bytes of foreign memory mapped here at `host` (at
    /// `iova == host`); mappings shared by several backends are counted.
    pub fn mirror(
        &self,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        host: *mut u8,
        len: u64,
    ) -> Result<(), DriverError> {
        let mut st = self.lock();
        if self.generation() == FAILED {
            return Err(DriverError::Transport(format!(
                "{}: device failed",
                self.target
            )));
        }
        let key = (host as u64, len);
        if let Some(n) = st.mirrors.get_mut(&key) {
            *n += 1;
            return Ok(());
        }
        st.ctrl.map_foreign(fd, file_offset, host, key.0, len)?;
        st.mirrors.insert(key, 1);
        Ok(())
    }

    /// Drop one use of a mirrored range; the last one unmaps it.
    pub fn unmirror(&self, host: u64, len: u64) {
        let mut st = self.lock();
        let Some(n) = st.mirrors.get_mut(&(host, len)) else {
            return; // already unmapped when the device failed
        };
        *n -= 1;
        if *n == 0 {
            st.mirrors.remove(&(host, len));
            if let Err(e) = st.ctrl.unmap_foreign(host, len) {
                log::warn!("{}: unmap guest region {host:#x}: {e}", self.target);
            }
        }
    }

    /// Health check by a backend that has commands outstanding for a while and last saw
    /// generation `seen`. A device that is gone, fatal or no longer ready (reset behind
    /// our back) is reset and brought up again; if that fails it is given up and its
    /// mirrors unmapped. Returns the current generation: `seen` when all is well.
    pub fn check(&self, seen: u64) -> u64 {
        let mut st = self.lock();
        let current = self.generation();
        if current != seen {
            return current; // someone else recovered (or gave up) already
        }
        let Err(e) = st.ctrl.check_health() else {
            return current;
        };
        log::error!("{}: backend device failed ({e}); resetting it", self.target);
        match st.ctrl.reset() {
            Ok(()) => {
                let next = current + 1;
                self.generation.store(next, Ordering::Release);
                log::warn!(
                    "{}: backend device recovered (reset {next}); outstanding I/O failed with a retryable status",
                    self.target
                );
                next
            }
            Err(e) => {
                log::error!("{}: reset failed ({e}); giving the device up", self.target);
                for ((host, len), _) in std::mem::take(&mut st.mirrors) {
                    if let Err(e) = st.ctrl.unmap_foreign(host, len) {
                        log::debug!("{}: unmap {host:#x} after failure: {e}", self.target);
                    }
                }
                self.generation.store(FAILED, Ordering::Release);
                FAILED
            }
        }
    }
}
