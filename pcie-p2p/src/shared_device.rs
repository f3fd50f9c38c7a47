//! One backend NVMe controller shared by every namespace backend that uses it: one SSD can
//! back several emulated namespaces (whole namespaces or LBA ranges of one) on different
//! front controllers, each served by its own reactor thread with its own I/O queue pair.
//!
//! The hot path touches only the backend's own queue pair (shared memory and a doorbell).
//! Everything that talks to the device's control path (a vfio-user socket, VFIO ioctls:
//! register reads, admin commands, DMA map changes) runs on the device's supervisor thread,
//! so a device that stops answering stalls that thread, never a reactor that polls other
//! tenants' controllers too. Backends post requests without waiting:
//! - a health check, when a backend has commands outstanding for a tick; a device that is
//!   gone, fatal or no longer ready is reset and brought up again (or given up);
//! - a new queue pair after a recovery reset, handed over when made;
//! - the deletion of a queue pair when a backend goes away.
//!
//! The supervisor also keeps the device's mapping of guest memory ("mirrors", for zero
//! copy) in line with every backend's guest DMA map: it watches their snapshots and
//! publishes, per backend, which ranges of which snapshot the device can reach. A backend
//! whose current snapshot has no published mirror yet bounces its I/O meanwhile.
//!
//! A recovery reset bumps a generation counter that every backend compares (one atomic
//! load) before it submits or polls: a backend that sees it change fails its outstanding
//! commands, stops using its queue pair and asks for a new one on the same queue id, so a
//! backend that has not caught up yet never rings a queue handed to another.
//!
//! Locks: the controller's mutex is held by the supervisor during slow calls (and by a
//! backend being set up, off the data path); the bookkeeping mutex and the per-backend
//! mirror mutex are only ever held for a few instructions, never across a device call.
//! Reactors take only those.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use device_model::GuestMemory;
use device_model::memory::MemoryMap;
use host_driver::{DmaMemory, DriverError, IoQueuePair, NvmeDriver};

/// Generation of a device given up for good (reset failed, device gone).
pub const FAILED: u64 = u64::MAX;

/// How often the supervisor looks at the backends' guest DMA maps when nothing else wakes
/// it (a client's new memory is usually mirrored before its first I/O).
const WATCH: Duration = Duration::from_millis(1);
/// Microseconds since the first call (at least 1).
fn now_us() -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_micros() as u64 + 1
}

/// How long setting up a backend waits for queue deletions the supervisor has not done yet.
const DELETE_WAIT: Duration = Duration::from_secs(35);

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

/// Guest memory the device can reach, as published to one backend: the `(host address,
/// length)` ranges of `snapshot` that are mapped for the device (at `iova == host`), sorted.
#[derive(Debug, Default)]
pub(crate) struct Mirrored {
    pub snapshot: Option<Arc<MemoryMap>>,
    pub ranges: Vec<(u64, u64)>,
}

impl Mirrored {
    /// True when these ranges belong to `map` (the backend's current snapshot).
    pub fn covers(&self, map: &Arc<MemoryMap>) -> bool {
        self.snapshot.as_ref().is_some_and(|s| Arc::ptr_eq(s, map))
    }
}

/// A backend's guest memory, watched by the supervisor, and what it published for it.
#[derive(Debug)]
pub(crate) struct Link {
    pub guest: Arc<GuestMemory>,
    published: Mutex<Arc<Mirrored>>,
    /// Bumped after every publication.
    pub version: AtomicU64,
}

impl Link {
    pub fn new(guest: Arc<GuestMemory>) -> Arc<Self> {
        Arc::new(Self {
            guest,
            published: Mutex::new(Arc::default()),
            version: AtomicU64::new(0),
        })
    }

    /// The last publication (a short lock, never held across a device call).
    pub fn published(&self) -> Arc<Mirrored> {
        Arc::clone(
            &self
                .published
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn publish(&self, m: Mirrored) {
        *self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(m);
        self.version.fetch_add(1, Ordering::Release);
    }
}

/// A new queue pair for a backend after a recovery reset.
pub(crate) enum Handover {
    /// Made in this generation.
    Ready(IoQueuePair, u64),
    Failed(DriverError),
}

#[derive(Clone, Copy)]
struct Recreate {
    qid: u16,
    size: u16,
    claim: Claim,
}

/// Bookkeeping shared by backends and the supervisor (short critical sections only).
#[derive(Default)]
struct Book {
    /// Active namespaces: (nsid, blocks, block size), as of the last bring-up.
    namespaces: Vec<(u32, u64, u64)>,
    claims: Vec<Claim>,
    /// Queue ids owned by a backend, kept across recovery resets.
    qids: BTreeSet<u16>,
    links: Vec<Arc<Link>>,
    /// A health check asked for by a backend that last saw this generation.
    check: Option<u64>,
    recreate: Vec<Recreate>,
    handover: HashMap<u16, Handover>,
    /// Queue ids given back, with the queue pair (and its generation) when there is one.
    delete: Vec<(u16, Option<(IoQueuePair, u64)>)>,
    /// Queue ids given back and not yet free.
    deleting: usize,
    /// Something changed in a guest DMA map: look now.
    poked: bool,
    stop: bool,
}

impl Book {
    fn has_work(&self) -> bool {
        self.check.is_some()
            || !self.recreate.is_empty()
            || !self.delete.is_empty()
            || self.poked
            || self.stop
    }
}

struct Inner {
    target: String,
    generation: AtomicU64,
    /// When the supervisor's current round of device calls began ([`now_us`]), 0 when idle.
    busy_since: AtomicU64,
    ctrl: Mutex<NvmeDriver>,
    book: Mutex<Book>,
    /// The supervisor waits on it for work.
    wake: Condvar,
    /// Set-up waits on it for queue deletions.
    deleted: Condvar,
}

impl Inner {
    fn book(&self) -> MutexGuard<'_, Book> {
        // every change under this lock is a single step: a panic leaves it consistent
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ctrl(&self) -> MutexGuard<'_, NvmeDriver> {
        self.ctrl.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[inline]
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// A backend controller shared by namespace backends.
pub struct SharedDevice {
    inner: Arc<Inner>,
    supervisor: Option<JoinHandle<()>>,
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

fn namespaces_of(ctrl: &NvmeDriver) -> Vec<(u32, u64, u64)> {
    ctrl.namespaces()
        .iter()
        .map(|n| (n.nsid, n.blocks, u64::from(n.block_size)))
        .collect()
}

impl SharedDevice {
    /// Share `ctrl` (brought up by the caller with as many I/O queues as backends will
    /// use), and start its supervisor thread.
    pub fn new(ctrl: NvmeDriver) -> Arc<Self> {
        let target = ctrl.target();
        let book = Book {
            namespaces: namespaces_of(&ctrl),
            ..Book::default()
        };
        let dma = Arc::clone(ctrl.dma());
        let max_transfer = ctrl.max_transfer();
        let max_queue_size = ctrl.max_queue_size();
        let inner = Arc::new(Inner {
            target: target.clone(),
            generation: AtomicU64::new(0),
            busy_since: AtomicU64::new(0),
            ctrl: Mutex::new(ctrl),
            book: Mutex::new(book),
            wake: Condvar::new(),
            deleted: Condvar::new(),
        });
        let sup = Supervisor {
            inner: Arc::clone(&inner),
            entries: HashMap::new(),
            seen: Vec::new(),
        };
        let supervisor = std::thread::Builder::new()
            .name("nvme-backend-sup".into())
            .spawn(move || sup.run())
            .expect("start the backend device's supervisor thread");
        Arc::new(Self {
            inner,
            supervisor: Some(supervisor),
            target,
            dma,
            max_transfer,
            max_queue_size,
        })
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
    #[inline]
    pub fn generation(&self) -> u64 {
        self.inner.generation()
    }

    /// Hand out `range` (byte offset and length; the whole namespace when `None`) of
    /// namespace `nsid`. Refused when the namespace is not active, the range is not
    /// block-aligned or runs past the end, or it overlaps a range already handed out.
    pub fn claim(&self, nsid: u32, range: Option<(u64, u64)>) -> Result<Claim, DriverError> {
        let mut st = self.inner.book();
        let &(_, blocks, bs) = st.namespaces.iter().find(|n| n.0 == nsid).ok_or_else(|| {
            DriverError::Invalid(format!("{}: no active namespace {nsid}", self.target))
        })?;
        let total = blocks * bs;
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
        self.inner.book().claims.retain(|c| c != claim);
    }

    /// Create a queue pair for one backend, on a queue id no other backend owns; returns
    /// it with the generation it belongs to. Set-up path: waits for the device.
    pub fn create_queue_pair(&self, size: u16) -> Result<(IoQueuePair, u64), DriverError> {
        // queue ids given back are free once the supervisor has deleted their queues
        {
            let start = Instant::now();
            let mut b = self.inner.book();
            while b.deleting > 0 && start.elapsed() < DELETE_WAIT {
                b = self
                    .inner
                    .deleted
                    .wait_timeout(b, Duration::from_millis(100))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        let mut ctrl = self.inner.ctrl();
        let generation = self.generation();
        if generation == FAILED {
            return Err(DriverError::Transport(format!(
                "{}: device failed",
                self.target
            )));
        }
        let count = ctrl.io_queue_count();
        let qid = {
            let b = self.inner.book();
            (1..=count).find(|q| !b.qids.contains(q)).ok_or_else(|| {
                DriverError::Invalid(format!(
                    "{}: all {count} I/O queues in use (one per namespace backend)",
                    self.target
                ))
            })?
        };
        let qp = ctrl.create_io_queue_pair_at(qid, size)?;
        self.inner.book().qids.insert(qid);
        Ok((qp, generation))
    }

    /// Give a backend's queue id back, with its queue pair (made in generation
    /// `generation`) when it has one; the supervisor deletes it. Does not wait.
    pub(crate) fn delete_queue_pair(&self, qid: u16, qp: Option<(IoQueuePair, u64)>) {
        let mut b = self.inner.book();
        b.delete.push((qid, qp));
        b.deleting += 1;
        drop(b);
        self.inner.wake.notify_one();
    }

    /// Ask for a new queue pair on `qid` after a recovery reset (the old one is no longer
    /// used); pick it up with [`Self::take_handover`]. Does not wait.
    pub(crate) fn request_queue_pair(&self, qid: u16, size: u16, claim: Claim) {
        self.inner
            .book()
            .recreate
            .push(Recreate { qid, size, claim });
        self.inner.wake.notify_one();
    }

    /// The queue pair made for `qid`, once it is there.
    pub(crate) fn take_handover(&self, qid: u16) -> Option<Handover> {
        self.inner.book().handover.remove(&qid)
    }

    /// Ask for a health check by a backend that has commands outstanding for a while and
    /// last saw generation `seen`. Does not wait: a recovery shows as a new generation.
    pub fn request_check(&self, seen: u64) {
        let mut b = self.inner.book();
        if b.check.is_none() {
            b.check = Some(seen);
            drop(b);
            self.inner.wake.notify_one();
        }
    }

    /// Watch `link`'s guest memory and publish its mirrors there.
    pub(crate) fn attach(&self, link: &Arc<Link>) {
        let mut b = self.inner.book();
        b.links.push(Arc::clone(link));
        b.poked = true;
        drop(b);
        self.inner.wake.notify_one();
    }

    /// Stop watching `link` (its mirrors are dropped unless other backends share them).
    pub(crate) fn detach(&self, link: &Arc<Link>) {
        let mut b = self.inner.book();
        b.links.retain(|l| !Arc::ptr_eq(l, link));
        b.poked = true;
        drop(b);
        self.inner.wake.notify_one();
    }

    /// True when the supervisor is expected to follow a DMA map change within `within`:
    /// the device is not given up and the supervisor is not stuck in a device call.
    pub(crate) fn mirror_coming(&self, within: Duration) -> bool {
        if self.generation() == FAILED {
            return false;
        }
        let since = self.inner.busy_since.load(Ordering::Acquire);
        since == 0 || now_us().saturating_sub(since) < within.as_micros() as u64
    }

    /// A guest DMA map changed: have the mirrors follow now.
    pub(crate) fn poke(&self) {
        self.inner.book().poked = true;
        self.inner.wake.notify_one();
    }
}

impl Drop for SharedDevice {
    fn drop(&mut self) {
        // the last backend is gone: the supervisor finishes what they asked for (queue
        // deletions, unmaps; each bounded by the transport's timeouts), shuts the
        // controller down and ends
        self.inner.book().stop = true;
        self.inner.wake.notify_one();
        if let Some(t) = self.supervisor.take()
            && t.join().is_err()
        {
            log::error!("{}: supervisor thread panicked", self.target);
        }
    }
}

/// A guest region mapped for the device, keyed by `(host address, length)`. The snapshot
/// it was mapped from is kept, so the host mapping (and the address) stays this region's
/// until the device's mapping is gone.
struct Entry {
    _snapshot: Arc<MemoryMap>,
}

struct Supervisor {
    inner: Arc<Inner>,
    entries: HashMap<(u64, u64), Entry>,
    /// The links and snapshots mirrored last.
    seen: Vec<(Arc<Link>, Arc<MemoryMap>)>,
}

struct Work {
    check: Option<u64>,
    recreate: Vec<Recreate>,
    delete: Vec<(u16, Option<(IoQueuePair, u64)>)>,
    links: Vec<Arc<Link>>,
    stop: bool,
}

impl Supervisor {
    fn target(&self) -> &str {
        &self.inner.target
    }

    fn run(mut self) {
        loop {
            let w = {
                let mut b = self.inner.book();
                if !b.has_work() {
                    b = self
                        .inner
                        .wake
                        .wait_timeout(b, WATCH)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                b.poked = false;
                Work {
                    check: b.check.take(),
                    recreate: std::mem::take(&mut b.recreate),
                    delete: std::mem::take(&mut b.delete),
                    links: b.links.clone(),
                    stop: b.stop,
                }
            };
            self.inner.busy_since.store(now_us(), Ordering::Release);
            if let Some(seen) = w.check {
                self.check(seen);
            }
            for r in w.recreate {
                self.recreate(r);
            }
            if !w.delete.is_empty() {
                for (qid, qp) in w.delete {
                    self.delete(qid, qp);
                }
                self.inner.deleted.notify_all();
            }
            self.sync_mirrors(&w.links);
            self.inner.busy_since.store(0, Ordering::Release);
            if w.stop {
                let b = self.inner.book();
                if b.delete.is_empty() && b.recreate.is_empty() && b.check.is_none() {
                    break;
                }
            }
        }
        self.seen.clear();
        self.unmap_all();
        let mut ctrl = self.inner.ctrl();
        if let Err(e) = ctrl.shutdown() {
            log::warn!("{}: shutdown: {e}", self.target());
        }
    }

    /// A device that is gone, fatal or no longer ready (reset behind our back) is reset
    /// and brought up again; if that fails it is given up and its mirrors unmapped.
    fn check(&mut self, seen: u64) {
        let current = self.inner.generation();
        if current != seen || current == FAILED {
            return; // recovered (or given up) since that backend looked
        }
        let inner = Arc::clone(&self.inner);
        let mut ctrl = inner.ctrl();
        let Err(e) = ctrl.check_health() else {
            return;
        };
        log::error!(
            "{}: backend device failed ({e}); resetting it",
            self.target()
        );
        match ctrl.reset() {
            Ok(()) => {
                let next = current + 1;
                {
                    let mut b = self.inner.book();
                    b.namespaces = namespaces_of(&ctrl);
                    // queues made before this reset no longer exist
                    b.handover.clear();
                }
                self.inner.generation.store(next, Ordering::Release);
                log::warn!(
                    "{}: backend device recovered (reset {next}); outstanding I/O failed with a retryable status",
                    self.target()
                );
            }
            Err(e) => {
                log::error!(
                    "{}: reset failed ({e}); giving the device up",
                    self.target()
                );
                drop(ctrl);
                self.give_up();
            }
        }
    }

    fn give_up(&mut self) {
        self.inner.generation.store(FAILED, Ordering::Release);
        self.unmap_all();
        for (link, _) in std::mem::take(&mut self.seen) {
            link.publish(Mirrored::default());
        }
        let mut b = self.inner.book();
        for r in std::mem::take(&mut b.recreate) {
            b.handover.insert(
                r.qid,
                Handover::Failed(DriverError::Transport("device failed".into())),
            );
        }
    }

    fn unmap_all(&mut self) {
        if self.entries.is_empty() {
            return;
        }
        let inner = Arc::clone(&self.inner);
        let mut ctrl = inner.ctrl();
        for ((host, len), _) in std::mem::take(&mut self.entries) {
            if let Err(e) = ctrl.unmap_foreign(host, len) {
                log::debug!("{}: unmap {host:#x}: {e}", self.target());
            }
        }
    }

    /// Make a backend's queue pair again on its queue id, checking that its range still
    /// fits its namespace.
    fn recreate(&mut self, r: Recreate) {
        let inner = Arc::clone(&self.inner);
        let generation = inner.generation();
        let res = if generation == FAILED {
            Err(DriverError::Transport(format!(
                "{}: device failed",
                self.target()
            )))
        } else {
            let mut ctrl = inner.ctrl();
            let c = r.claim;
            let fits = ctrl.namespaces().iter().any(|n| {
                n.nsid == c.nsid && u64::from(n.block_size) == c.block_size && n.blocks >= c.end()
            });
            if fits {
                ctrl.create_io_queue_pair_at(r.qid, r.size)
            } else {
                Err(DriverError::Invalid(format!(
                    "{}: namespace {} changed across the reset",
                    self.target(),
                    c.nsid
                )))
            }
        };
        let h = match res {
            Ok(qp) => Handover::Ready(qp, generation),
            Err(e) => Handover::Failed(e),
        };
        inner.book().handover.insert(r.qid, h);
    }

    fn delete(&mut self, qid: u16, qp: Option<(IoQueuePair, u64)>) {
        let inner = Arc::clone(&self.inner);
        // a queue pair made for a backend that left before picking it up
        let handed = match inner.book().handover.remove(&qid) {
            Some(Handover::Ready(qp, g)) => Some((qp, g)),
            _ => None,
        };
        for (qp, generation) in qp.into_iter().chain(handed) {
            // after a reset since, the queue no longer exists on the controller
            if generation == inner.generation()
                && generation != FAILED
                && let Err(e) = inner.ctrl().delete_io_queue_pair(qp)
            {
                log::warn!("{}: delete queue pair: {e}", self.target());
            }
        }
        let mut b = inner.book();
        b.qids.remove(&qid);
        b.deleting -= 1;
    }

    /// Map the guest regions the backends' current snapshots hold and unmap those no
    /// snapshot holds any more (unmaps first: a host address may be reused), then tell
    /// each backend which ranges of its snapshot the device reaches.
    fn sync_mirrors(&mut self, links: &[Arc<Link>]) {
        let now: Vec<(Arc<Link>, Arc<MemoryMap>)> = links
            .iter()
            .map(|l| (Arc::clone(l), l.guest.snapshot()))
            .collect();
        let same = now.len() == self.seen.len()
            && now
                .iter()
                .zip(&self.seen)
                .all(|(a, b)| Arc::ptr_eq(&a.0, &b.0) && Arc::ptr_eq(&a.1, &b.1));
        if same {
            return;
        }
        let inner = Arc::clone(&self.inner);
        if inner.generation() == FAILED {
            for (link, snap) in &now {
                link.publish(Mirrored {
                    snapshot: Some(Arc::clone(snap)),
                    ranges: Vec::new(),
                });
            }
            self.seen = now;
            return;
        }
        let mut wanted: HashMap<(u64, u64), (&Arc<MemoryMap>, usize)> = HashMap::new();
        for (_, snap) in &now {
            for (i, r) in snap.regions().iter().enumerate() {
                if let Some(b) = r.backing() {
                    wanted.insert((b.host as u64, b.len), (snap, i));
                }
            }
        }
        let mut broken = false;
        {
            let mut ctrl = inner.ctrl();
            let gone: Vec<(u64, u64)> = self
                .entries
                .keys()
                .filter(|k| !wanted.contains_key(k))
                .copied()
                .collect();
            for (host, len) in gone {
                self.entries.remove(&(host, len));
                if let Err(e) = ctrl.unmap_foreign(host, len) {
                    log::warn!("{}: unmap guest region {host:#x}: {e}", self.target());
                    broken |= matches!(e, DriverError::Transport(_));
                }
            }
            for (&key, &(snap, i)) in &wanted {
                if self.entries.contains_key(&key) {
                    continue;
                }
                let Some(b) = snap.regions()[i].backing() else {
                    continue;
                };
                match ctrl.map_foreign(b.fd, b.file_offset, b.host, key.0, key.1) {
                    Ok(()) => {
                        self.entries.insert(
                            key,
                            Entry {
                                _snapshot: Arc::clone(snap),
                            },
                        );
                    }
                    Err(e) => {
                        log::warn!(
                            "{}: guest region {:#x}+{:#x} not mirrored, its I/O bounces: {e}",
                            self.target(),
                            key.0,
                            key.1
                        );
                        broken |= matches!(e, DriverError::Transport(_));
                    }
                }
            }
        }
        for (link, snap) in &now {
            let mut ranges: Vec<(u64, u64)> = snap
                .regions()
                .iter()
                .filter_map(|r| r.backing().map(|b| (b.host as u64, b.len)))
                .filter(|k| self.entries.contains_key(k))
                .collect();
            ranges.sort_unstable();
            log::debug!(
                "{}: mirroring {} guest regions for a backend",
                self.target(),
                ranges.len()
            );
            link.publish(Mirrored {
                snapshot: Some(Arc::clone(snap)),
                ranges,
            });
        }
        self.seen = now;
        if broken {
            // the control path failed under us: find out whether the device is still there
            let g = inner.generation();
            self.check(g);
        }
    }
}
