//! The handles: [`Store`] for management (shared, cheap to clone) and [`LvolBackend`], a
//! volume as a namespace's [`Backend`]. All of a store's state is behind one lock, as a
//! namespace shared between controllers is ([`device_model::backend::SharedBackend`]):
//! a volume's requests take it for their submission and their poll. The lock is a
//! [`YieldLock`], whose release does not wait for the store buffer (a write to a RAM base
//! copies 4 KiB inside it).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use sys_util::{YieldGuard, YieldLock};

use device_model::backend::{Backend, GuestBufferList, IoBuffer, IoOp, IoRequest};
use nvme_spec::Status;

use super::error::{LvolError, Result};
use super::inflight::HeldRequest;
use super::ops::VolumeInfo;
use super::store::{Core, Faults, LoadReport, NO_WARNING, read_bytes};
use super::superblock::{SB_SIZE, Superblock};
use super::syncio::SyncIo;

/// Default cluster size: 1 MiB.
pub const DEFAULT_CLUSTER: u64 = 1 << 20;

/// Options of a new store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Store name.
    pub name: String,
    /// Cluster size in bytes (power of two, 16 KiB to 64 MiB).
    pub cluster_size: u64,
    /// Journal length in bytes (default: 16 bytes per cluster, 1 to 64 MiB).
    pub journal_len: Option<u64>,
}

/// What a store reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreStatus {
    /// Name.
    pub name: String,
    /// Bytes of data clusters.
    pub capacity: u64,
    /// Bytes of clusters in use (or not reusable yet).
    pub used: u64,
    /// Free clusters.
    pub clusters_free: u64,
    /// All data clusters.
    pub clusters: u64,
    /// Cluster size.
    pub cluster_size: u64,
    /// Volumes and snapshots.
    pub volumes: usize,
    /// Checkpoint bytes now, and the slot's size.
    pub metadata: (u64, u64),
    /// Why the store takes no more changes, if it does not.
    pub failed: Option<String>,
}

/// A volume store (a handle; clones share it).
#[derive(Clone)]
pub struct Store {
    core: Arc<Shared>,
    name: String,
}

/// The store's core behind its lock, and the handles closed while it was held.
struct Shared {
    core: YieldLock<Core>,
    /// `(volume, user)` of handles dropped while someone held the lock: closed by the next
    /// holder (a handle is dropped on its controller's reactor, which must not wait for a
    /// management operation).
    closing: std::sync::Mutex<Vec<(u32, usize)>>,
    any_closing: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn new(core: Core) -> Self {
        Self {
            core: YieldLock::new(core),
            closing: std::sync::Mutex::new(Vec::new()),
            any_closing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The core, waiting for it (management).
    fn lock(&self) -> YieldGuard<'_, Core> {
        let mut c = self.core.lock();
        self.apply_closes(&mut c);
        c
    }

    /// The core if it is free now (the data path).
    fn try_lock(&self) -> Option<YieldGuard<'_, Core>> {
        let mut c = self.core.try_lock()?;
        self.apply_closes(&mut c);
        Some(c)
    }

    /// Close handle `(vol, user)` now if the core is free, else leave it to the next holder.
    fn close_handle(&self, vol: u32, user: usize) {
        if let Some(mut c) = self.core.try_lock() {
            close_handle(&mut c, vol, user);
            return;
        }
        self.closing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((vol, user));
        self.any_closing.store(true, Ordering::Release);
        // the holder may have checked just before: take it back if it is free by now
        if let Some(c) = self.try_lock() {
            drop(c);
        }
    }

    fn apply_closes(&self, c: &mut Core) {
        if !self.any_closing.load(Ordering::Acquire) {
            return;
        }
        // cleared before the list is taken: a close pushed meanwhile sets it again
        self.any_closing.store(false, Ordering::Release);
        let list = std::mem::take(
            &mut *self
                .closing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for (vol, user) in list {
            close_handle(c, vol, user);
        }
    }
}

/// Handle `user` on volume `vol` is gone: the volume is open once less, the user slot free.
fn close_handle(c: &mut Core, vol: u32, user: usize) {
    if let Some(n) = c.open.get_mut(&vol) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            c.sizes.remove(&vol);
        }
    }
    if let Some(u) = c.dp.users.get_mut(user) {
        u.taken = false;
        u.done.clear();
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("name", &self.name).finish()
    }
}

/// How long an inflate or decouple holds the store's lock at a time (one cluster's copy at
/// least), and how long it leaves it free in between.
const PRIVATIZE_STEP: std::time::Duration = std::time::Duration::from_millis(1);
const PRIVATIZE_PAUSE: std::time::Duration = std::time::Duration::from_micros(200);

fn lock(m: &Shared) -> YieldGuard<'_, Core> {
    m.lock()
}

impl Store {
    fn wrap(core: Core) -> Self {
        let name = core.sb.name.clone();
        Self {
            core: Arc::new(Shared::new(core)),
            name,
        }
    }

    /// Make a new store on `base` (what it held is lost).
    pub fn format(base: Box<dyn Backend>, opts: &StoreOptions) -> Result<Self> {
        Core::format(base, &opts.name, opts.cluster_size, opts.journal_len).map(Self::wrap)
    }

    /// Load the store `base` carries.
    pub fn load(base: Box<dyn Backend>) -> Result<(Self, LoadReport)> {
        let (core, report) = Core::load(base)?;
        log::info!(
            "volume store {}: {} volumes, {} mapped clusters, {} journal records, loaded in {} ms",
            core.sb.name,
            report.volumes,
            report.mapped,
            report.replayed,
            report.millis
        );
        Ok((Self::wrap(core), report))
    }

    /// Load the store `base` holds, or make one (with `opts`) when it holds none (no
    /// superblock magic in either copy). A damaged store is an error, never formatted.
    /// Returns the load's report, none for a new store.
    pub fn load_or_format(
        mut base: Box<dyn Backend>,
        opts: &StoreOptions,
    ) -> Result<(Self, Option<LoadReport>)> {
        match probe(base.as_mut()) {
            Ok(_) => Self::load(base).map(|(s, r)| (s, Some(r))),
            Err(LvolError::NoStore(_)) => Self::format(base, opts).map(|s| (s, None)),
            Err(e) => Err(e),
        }
    }

    /// The store's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Capacity, use, free clusters.
    pub fn status(&self) -> StoreStatus {
        let c = lock(&self.core);
        StoreStatus {
            name: c.sb.name.clone(),
            capacity: c.geo.clusters * c.geo.cluster_size,
            used: (c.geo.clusters - c.free.len() as u64) * c.geo.cluster_size,
            clusters_free: c.free.len() as u64,
            clusters: c.geo.clusters,
            cluster_size: c.geo.cluster_size,
            volumes: c.meta.volumes.len(),
            metadata: c.metadata_use(),
            failed: c.failed.clone(),
        }
    }

    /// Volumes and snapshots, by name.
    pub fn list(&self) -> Vec<VolumeInfo> {
        lock(&self.core).list()
    }

    /// Create a volume of `size` bytes (multiple of 4 KiB), thin or thick (all clusters
    /// allocated and zeroed now).
    pub fn create(&self, name: &str, size: u64, thin: bool) -> Result<()> {
        lock(&self.core).create(name, size, thin)
    }

    /// Delete a volume or snapshot (refused while open).
    pub fn delete(&self, name: &str) -> Result<()> {
        lock(&self.core).delete(name)
    }

    /// Resize a volume (shrink refused while open).
    pub fn resize(&self, name: &str, size: u64) -> Result<()> {
        lock(&self.core).resize(name, size)
    }

    /// Rename a volume or snapshot.
    pub fn rename(&self, name: &str, new: &str) -> Result<()> {
        lock(&self.core).rename(name, new)
    }

    /// Snapshot volume `name` as `snap` (instant, read-only).
    pub fn snapshot(&self, name: &str, snap: &str) -> Result<()> {
        lock(&self.core).snapshot(name, snap)
    }

    /// Clone snapshot `snap` as a writable thin volume `name`.
    pub fn clone_snapshot(&self, snap: &str, name: &str) -> Result<()> {
        lock(&self.core).clone_snapshot(snap, name)
    }

    /// Inflate: the volume gets its own copy of every cluster (it becomes thick) and no
    /// longer depends on its parent.
    pub fn inflate(&self, name: &str) -> Result<()> {
        self.make_independent(name, true)
    }

    /// Decouple: the volume gets its own copy of every cluster it shares (unmapped ones
    /// stay unmapped) and no longer depends on its parent.
    pub fn decouple(&self, name: &str) -> Result<()> {
        self.make_independent(name, false)
    }

    /// Inflate or decouple in steps of about [`PRIVATIZE_STEP`], the lock free for a
    /// moment between them: the store's other volumes (other tenants' namespaces) see
    /// their requests delayed by a step, not by the whole copy.
    fn make_independent(&self, name: &str, thick: bool) -> Result<()> {
        let id = lock(&self.core).begin_independent(name, thick)?;
        let mut from = 0;
        let steps = loop {
            let step = lock(&self.core).make_independent_step(id, thick, from, PRIVATIZE_STEP);
            match step {
                Ok(Some(next)) => from = next,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
            std::thread::sleep(PRIVATIZE_PAUSE);
        };
        lock(&self.core).end_independent(id, thick, steps)
    }

    /// Make everything so far durable.
    pub fn flush(&self) -> Result<()> {
        let mut c = lock(&self.core);
        let r = c.commit();
        c.apply_deferred();
        r
    }

    /// Percent of clusters in use at which a warning is logged (default 90).
    pub fn set_threshold(&self, percent: u8) {
        let mut c = lock(&self.core);
        c.threshold = percent.min(100);
        c.update_warning();
    }

    /// Commit the mapping changes of a guest request (a first write to a thin cluster, a
    /// copy-on-write, a deallocate) before acknowledging it, as a FUA write would, instead
    /// of at the next Flush. Needed where the process can die without the host seeing a
    /// power loss: a supervised worker (`serve --supervised`) that is killed and replaced
    /// must not take acknowledged mappings with it. Off by default (a crash of the daemon
    /// is a power loss to the host, and unflushed writes may be lost then).
    pub fn set_mappings_before_ack(&self, on: bool) {
        lock(&self.core).mappings_before_ack = on;
    }

    /// The core, locked (tests build big metadata directly).
    #[cfg(test)]
    pub(crate) fn core(&self) -> YieldGuard<'_, Core> {
        lock(&self.core)
    }

    /// Deliberate faults, for tests of the tests.
    #[doc(hidden)]
    pub fn set_faults(&self, f: Faults) {
        lock(&self.core).faults = f;
    }

    /// Open volume `name` as a backend (snapshots open read-only).
    pub fn open(&self, name: &str) -> Result<LvolBackend> {
        let mut c = lock(&self.core);
        let id = c.id_of(name)?;
        *c.open.entry(id).or_default() += 1;
        let size = c.meta.volumes[&id].size;
        let size = c
            .sizes
            .entry(id)
            .or_insert_with(|| Arc::new(AtomicU64::new(size)))
            .clone();
        let user = c.dp.register();
        Ok(LvolBackend {
            size,
            in_flight: 0,
            warning: c.warning.clone(),
            core: self.core.clone(),
            vol: id,
            user,
            describe: format!("lvol:{}/{name}", self.name),
            queued: Vec::new(),
            spare: Vec::new(),
            usage: UsageCache::default(),
        })
    }

    /// True when no volume is open.
    pub fn idle(&self) -> bool {
        lock(&self.core).open.values().all(|&n| n == 0)
    }

    /// Stop the store and hand its base back (refused while a volume is open; what was
    /// written is committed first).
    pub fn close(self) -> std::result::Result<Box<dyn Backend>, (Self, LvolError)> {
        if !self.idle() {
            return Err((self, LvolError::InUse("a volume of the store".into())));
        }
        if let Err(e) = self.flush() {
            log::warn!("volume store {}: {e}", self.name);
        }
        match Arc::try_unwrap(self.core) {
            Ok(m) => {
                let mut core = m.core.into_inner();
                // committed above: the core's drop has nothing left to write
                core.records.clear();
                core.dirty.clear();
                Ok(std::mem::replace(
                    &mut core.base,
                    Box::new(device_model::backend::NullBackend::new(0)),
                ))
            }
            Err(core) => {
                let name = self.name;
                Err((
                    Self { core, name },
                    LvolError::InUse("another handle on the store".into()),
                ))
            }
        }
    }
}

/// The superblock `base` holds (the newest valid copy), without loading the store.
pub fn probe(base: &mut dyn Backend) -> Result<super::superblock::Superblock> {
    let mut sync = SyncIo::default();
    if base.size() < 2 * SB_SIZE as u64 {
        return Err(LvolError::NoStore(
            "the backend is smaller than two superblocks".into(),
        ));
    }
    let head = read_bytes(
        base,
        &mut sync,
        "read the superblocks",
        0,
        2 * SB_SIZE as u64,
    )?;
    Superblock::pick(&head[..SB_SIZE], &head[SB_SIZE..]).map(|(sb, _)| sb)
}

/// Erase the store `base` holds: both superblock copies are zeroed (the data is not).
pub fn wipe(base: &mut dyn Backend) -> Result<()> {
    let mut sync = SyncIo::default();
    let len = 2 * SB_SIZE as u64;
    let buf = IoBuffer::new(len as usize);
    sync.run(
        base,
        "wipe the superblocks",
        IoOp::Write { fua: false },
        0,
        Some((&buf, 0)),
        len,
    )?;
    sync.run(base, "wipe the superblocks", IoOp::Flush, 0, None, 0)
}

/// A volume as a namespace backend.
pub struct LvolBackend {
    core: Arc<Shared>,
    warning: Arc<AtomicU8>,
    /// Requests started and not yet handed back (kept here: the controller asks at every
    /// reap, which must not take the store's lock).
    in_flight: usize,
    /// The volume's size (every I/O's range check asks: no lock).
    size: Arc<AtomicU64>,
    vol: u32,
    user: usize,
    describe: String,
    /// Requests taken while the store's lock was held elsewhere (a management operation:
    /// an inflate may hold it for long), started by the first poll that gets the lock. The
    /// reactor never waits for the lock on the data path.
    queued: Vec<HeldRequest>,
    /// Buffer lists of started queued requests, for reuse.
    spare: Vec<GuestBufferList>,
    /// The last thin usage reported.
    usage: UsageCache,
}

/// The last answer of [`Backend::thin_usage`], kept without a lock.
#[derive(Debug, Default)]
struct UsageCache {
    /// 0: none yet, 1: not thin, 2: thin with `used` and `cap`.
    kind: AtomicU8,
    used: AtomicU64,
    cap: AtomicU64,
}

impl UsageCache {
    fn set(&self, u: Option<(u64, u64)>) {
        if let Some((used, cap)) = u {
            self.used.store(used, Ordering::Relaxed);
            self.cap.store(cap, Ordering::Relaxed);
        }
        self.kind
            .store(if u.is_some() { 2 } else { 1 }, Ordering::Release);
    }

    /// The last answer, if there was one (`Err`: none yet).
    fn last(&self) -> std::result::Result<Option<(u64, u64)>, ()> {
        match self.kind.load(Ordering::Acquire) {
            0 => Err(()),
            1 => Ok(None),
            _ => Ok(Some((
                self.used.load(Ordering::Relaxed),
                self.cap.load(Ordering::Relaxed),
            ))),
        }
    }
}

impl std::fmt::Debug for LvolBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

impl Backend for LvolBackend {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn live_size(&self) -> Option<Arc<AtomicU64>> {
        Some(self.size.clone())
    }

    fn submit(&mut self, req: &IoRequest<'_>) -> std::result::Result<(), Status> {
        if self.queued.is_empty()
            && let Some(mut c) = self.core.try_lock()
        {
            c.submit(self.user, self.vol, req)?;
            self.in_flight += 1;
            return Ok(());
        }
        // the store is busy elsewhere (or requests wait already: they keep their order)
        if req.op != IoOp::Flush
            && req
                .offset
                .checked_add(req.len())
                .is_none_or(|end| end > self.size.load(Ordering::Relaxed))
        {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        let list = self.spare.pop().unwrap_or_default();
        self.queued.push(HeldRequest::keep(req, list));
        self.in_flight += 1;
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        let Some(mut c) = self.core.try_lock() else {
            return 0; // a management operation holds the store: next poll
        };
        if !self.queued.is_empty() {
            start_queued(
                &mut c,
                (self.user, self.vol),
                &mut self.queued,
                &mut self.spare,
            );
        }
        c.poll_base();
        let Some(u) = c.dp.users.get_mut(self.user) else {
            return 0;
        };
        let n = u.done.len();
        for (t, s) in u.done.drain(..) {
            done(t, s);
        }
        self.in_flight = self.in_flight.saturating_sub(n);
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn thin_usage(&self) -> Option<(u64, u64)> {
        // Identify asks on the reactor: while a management operation holds the store, the
        // last answer (a first one waits)
        let c = match self.core.try_lock() {
            Some(c) => c,
            None => match self.usage.last() {
                Ok(last) => return last,
                Err(()) => lock(&self.core),
            },
        };
        let now = c.meta.volumes.get(&self.vol).and_then(|v| {
            let used = c.used_bytes(self.vol);
            let cap = (used + c.free.len() as u64 * c.geo.cluster_size).min(v.size);
            v.thin.then_some((used.min(v.size), cap))
        });
        self.usage.set(now);
        now
    }

    fn capacity_warning(&self) -> Option<u8> {
        let w = self.warning.load(Ordering::Relaxed);
        (w != NO_WARNING).then_some(w)
    }
}

/// Start the requests `queued` by handle `user` on volume `vol`; one the store refuses
/// completes with the refusal. Their buffer lists go to `spare`.
fn start_queued(
    c: &mut Core,
    (user, vol): (usize, u32),
    queued: &mut Vec<HeldRequest>,
    spare: &mut Vec<GuestBufferList>,
) {
    for q in queued.drain(..) {
        if let Err(s) = c.submit(user, vol, &q.request()) {
            c.dp.deliver(user, q.tag(), s);
        }
        spare.push(q.into_list());
    }
}

impl Drop for LvolBackend {
    fn drop(&mut self) {
        // on the reactor: never waits for a management operation holding the store
        self.core.close_handle(self.vol, self.user);
    }
}
