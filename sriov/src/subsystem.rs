//! An NVM subsystem (NVMe base 2.0 §3.2.1): its controllers and the namespaces it owns, each
//! attached to a chosen set of controllers. Namespace Management (§5.20) creates and deletes
//! namespaces (carved from a [`NamespacePool`]), Namespace Attachment (§5.19) and the
//! management plane attach and detach them at run time.
//!
//! The state sits behind one mutex, touched by admin commands and management only (never by
//! I/O). A change reaches each affected controller as a [`NamespaceChange`] message posted to
//! its reactor ([`Poster`]): attach hands it a new handle on the namespace's shared backend, detach
//! takes the namespace away from its host at once and drops the handle once the requests
//! in flight on it have finished (polled, never waited for on the reactor); either way the
//! controller records the NSID in its Changed Namespace List and raises a Namespace
//! Attribute Changed event (§5.2, log page 04h).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use device_model::backend::{Backend, SharedSource};
use device_model::journal::Journal;
use device_model::namespace::{Namespace, NsIds};
use device_model::{
    CommandTag, NamespaceChange, NsError, NvmSubsystem, Poster, SettleChange, SubsystemNamespace,
};

use crate::pool::NamespacePool;
use crate::saved_namespaces::{SavedNamespace, SavedNamespaces};

/// Highest NSID of a subsystem that manages namespaces (Identify NN and MNAN).
pub const MAX_NAMESPACES: u32 = 256;

/// How a namespace's backend is held.
enum Source {
    /// Each attached controller gets a handle.
    Shared(SharedSource),
    /// The subsystem's only controller owns the backend (no lock on the data path); taken
    /// when that controller is built.
    Exclusive(Option<Box<dyn Backend>>),
}

/// A namespace the subsystem owns.
struct Entry {
    nsid: u32,
    lba_shift: u8,
    /// May be attached to more than one controller (NMIC bit 0).
    shared: bool,
    /// Size when added (see [`Entry::size`]).
    size: u64,
    /// The backend's size cell, when its size changes at run time (a resized volume).
    live: Option<Arc<AtomicU64>>,
    /// Identity seed (stable for configured namespaces, fresh for created ones).
    seed: String,
    source: Source,
    /// CNTLIDs it is attached to, ascending.
    attached: Vec<u16>,
    /// Bytes taken from the pool (0: a configured namespace).
    pooled: u64,
    /// Its number among the namespaces created (its identity seed), 0 if not created.
    created: u64,
    /// Added by the management plane (`ns_add`): its replay, not the saved state, makes it
    /// again in the next worker, deletions included.
    added: bool,
}

impl Entry {
    /// Size in bytes now.
    fn size(&self) -> u64 {
        self.live
            .as_ref()
            .map_or(self.size, |l| l.load(Ordering::Relaxed))
    }

    fn info(&self) -> SubsystemNamespace {
        SubsystemNamespace {
            nsid: self.nsid,
            size: self.size(),
            lba_shift: self.lba_shift,
            shared: self.shared,
            attached: self.attached.clone(),
            pooled: self.pooled > 0,
            ids: NsIds::derive(self.nsid, &self.seed),
        }
    }

    fn namespace(&self, backend: Box<dyn Backend>) -> Namespace {
        let mut ns = Namespace::new(self.nsid, backend, self.lba_shift, &self.seed);
        ns.shared = self.shared;
        ns
    }
}

/// A controller of the subsystem.
#[derive(Debug, Clone)]
struct Member {
    cntlid: u16,
    poster: Option<Poster>,
}

struct State {
    controllers: Vec<Member>,
    namespaces: Vec<Entry>,
    pool: Option<Box<dyn NamespacePool>>,
    /// Namespaces created so far (identity seeds of created namespaces).
    generation: u64,
    /// Bytes of the namespaces configured at start (never less when they are deleted).
    configured: u64,
    /// Under a supervisor: the journal the namespaces are kept in.
    kept: Option<KeptIn>,
    /// The admin command that made the last change, with its dword 0 (saved with it).
    last: Option<(CommandTag, u32)>,
    /// The NSID of the most recent change (`SavedNamespaces::recent`).
    recent: u32,
}

/// Where a supervised worker keeps the subsystem's namespaces: its keeper controller's
/// journal (the PF's, or the one vfio-user controller's).
struct KeptIn {
    journal: Journal,
    /// What an earlier worker saved, until [`Subsystem::settle`] puts it back.
    saved: Option<SavedNamespaces>,
    /// Put back: from now on every change is saved before it is answered.
    settled: bool,
}

/// What [`Subsystem::settle`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Attachments made and taken away.
    pub attached: usize,
    pub detached: usize,
    /// Namespaces of the pool opened again.
    pub reopened: usize,
    /// Namespaces taken away (deleted since the configuration, or added and deleted).
    pub removed: usize,
    /// Saved namespaces that could not be put back (logged).
    pub lost: usize,
}

/// Changes to deliver, by CNTLID.
type Changes = Vec<(u16, NamespaceChange)>;

/// An NVM subsystem.
pub struct Subsystem {
    nqn: String,
    state: Mutex<State>,
}

impl std::fmt::Debug for Subsystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subsystem")
            .field("nqn", &self.nqn)
            .finish_non_exhaustive()
    }
}

impl Subsystem {
    /// A subsystem with no controllers or namespaces yet.
    pub fn new(nqn: &str, pool: Option<Box<dyn NamespacePool>>) -> Arc<Self> {
        Arc::new(Self {
            nqn: nqn.into(),
            state: Mutex::new(State {
                controllers: Vec::new(),
                namespaces: Vec::new(),
                pool,
                generation: 0,
                configured: 0,
                kept: None,
                last: None,
                recent: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The subsystem NQN.
    pub fn nqn(&self) -> &str {
        &self.nqn
    }

    /// Add controller `cntlid` (before it is built).
    pub fn add_controller(&self, cntlid: u16) {
        let mut st = self.lock();
        if st.controllers.iter().all(|m| m.cntlid != cntlid) {
            st.controllers.push(Member {
                cntlid,
                poster: None,
            });
            st.controllers.sort_by_key(|m| m.cntlid);
        }
    }

    /// Where changes for controller `cntlid` go, once it runs.
    pub fn set_poster(&self, cntlid: u16, poster: Poster) {
        if let Some(m) = self
            .lock()
            .controllers
            .iter_mut()
            .find(|m| m.cntlid == cntlid)
        {
            m.poster = Some(poster);
        }
    }

    /// Namespaces can change at run time: there is more than one controller to share them
    /// with, or a pool to create them from. Otherwise they are fixed and owned by the one
    /// controller (no lock on its data path).
    pub fn manages_namespaces(&self) -> bool {
        let st = self.lock();
        st.controllers.len() > 1 || st.pool.is_some()
    }

    /// Add a configured namespace attached to `attach` (call after every
    /// [`Subsystem::add_controller`] and before building the controllers).
    pub fn add_namespace(
        &self,
        nsid: u32,
        backend: Box<dyn Backend>,
        lba_shift: u8,
        seed: &str,
        attach: &[u16],
    ) {
        self.add(nsid, backend, lba_shift, seed, attach, false);
    }

    /// Add a namespace at run time (the management plane's `ns_add`), not attached.
    pub fn add_run_time_namespace(
        &self,
        nsid: u32,
        backend: Box<dyn Backend>,
        lba_shift: u8,
        seed: &str,
    ) {
        self.add(nsid, backend, lba_shift, seed, &[], true);
    }

    fn add(
        &self,
        nsid: u32,
        backend: Box<dyn Backend>,
        lba_shift: u8,
        seed: &str,
        attach: &[u16],
        added: bool,
    ) {
        let managed = self.manages_namespaces();
        let mut st = self.lock();
        let size = backend.size();
        let live = backend.live_size();
        st.configured += size;
        let source = if managed {
            Source::Shared(SharedSource::new(backend))
        } else {
            Source::Exclusive(Some(backend))
        };
        let mut attached = attach.to_vec();
        attached.sort_unstable();
        attached.dedup();
        st.namespaces.push(Entry {
            nsid,
            lba_shift,
            shared: managed,
            size,
            live,
            seed: seed.into(),
            source,
            attached,
            pooled: 0,
            created: 0,
            added,
        });
        st.namespaces.sort_by_key(|e| e.nsid);
        if added {
            st.recent = nsid;
        }
        self.persist(&st);
    }

    /// The namespaces controller `cntlid` starts with.
    pub fn namespaces_for(&self, cntlid: u16) -> Vec<Namespace> {
        let mut st = self.lock();
        let mut out = Vec::new();
        for e in &mut st.namespaces {
            if !e.attached.contains(&cntlid) {
                continue;
            }
            let backend: Option<Box<dyn Backend>> = match &mut e.source {
                Source::Shared(src) => src.handle().map(|h| Box::new(h) as Box<dyn Backend>),
                Source::Exclusive(b) => b.take(),
            };
            if let Some(b) = backend {
                out.push(e.namespace(b));
            }
        }
        out
    }

    /// CNTLIDs of every controller, ascending (Identify CNS 13h).
    pub fn controllers(&self) -> Vec<u16> {
        self.lock().controllers.iter().map(|m| m.cntlid).collect()
    }

    /// CNTLIDs namespace `nsid` is attached to (Identify CNS 12h); `None`: not allocated.
    pub fn attached(&self, nsid: u32) -> Option<Vec<u16>> {
        let st = self.lock();
        st.namespaces
            .iter()
            .find(|e| e.nsid == nsid)
            .map(|e| e.attached.clone())
    }

    /// Allocated NSIDs above `after`, ascending (Identify CNS 10h).
    pub fn allocated(&self, after: u32) -> Vec<u32> {
        let st = self.lock();
        st.namespaces
            .iter()
            .map(|e| e.nsid)
            .filter(|&n| n > after)
            .collect()
    }

    /// One namespace, attached anywhere or not.
    pub fn namespace(&self, nsid: u32) -> Option<SubsystemNamespace> {
        let st = self.lock();
        st.namespaces
            .iter()
            .find(|e| e.nsid == nsid)
            .map(Entry::info)
    }

    /// Every namespace.
    pub fn list(&self) -> Vec<SubsystemNamespace> {
        self.lock().namespaces.iter().map(Entry::info).collect()
    }

    /// Highest NSID (Identify NN): [`MAX_NAMESPACES`] when namespaces are managed, else the
    /// highest configured.
    pub fn max_nsid(&self) -> u32 {
        if self.manages_namespaces() {
            return MAX_NAMESPACES;
        }
        self.lock()
            .namespaces
            .iter()
            .map(|e| e.nsid)
            .max()
            .unwrap_or(0)
    }

    /// Total and unallocated NVM capacity in bytes (Identify TNVMCAP, UNVMCAP).
    pub fn capacity(&self) -> (u64, u64) {
        capacity_of(&self.lock())
    }

    /// The pool, described.
    pub fn pool(&self) -> Option<String> {
        self.lock().pool.as_ref().map(|p| p.describe())
    }

    /// Create a namespace of `size` bytes with `2^lba_shift`-byte blocks, not attached to
    /// any controller (§5.20, SEL 0). Returns its NSID.
    pub fn create(&self, size: u64, lba_shift: u8, shared: bool) -> Result<u32, NsError> {
        self.create_tagged(size, lba_shift, shared, None)
    }

    /// [`Subsystem::create`] by admin command `tag`.
    fn create_tagged(
        &self,
        size: u64,
        lba_shift: u8,
        shared: bool,
        tag: Option<CommandTag>,
    ) -> Result<u32, NsError> {
        if !self.manages_namespaces() {
            return Err(NsError::Fixed);
        }
        if lba_shift != 9 && lba_shift != 12 {
            return Err(NsError::InvalidFormat);
        }
        if size == 0 || !size.is_multiple_of(1 << lba_shift) {
            return Err(NsError::InvalidField);
        }
        let mut st = self.lock();
        let (_, free) = capacity_of(&st);
        if st.pool.is_none() || size > free {
            return Err(NsError::InsufficientCapacity);
        }
        let nsid = (1..=MAX_NAMESPACES)
            .find(|n| st.namespaces.iter().all(|e| e.nsid != *n))
            .ok_or(NsError::IdUnavailable)?;
        let Some(pool) = st.pool.as_mut() else {
            return Err(NsError::InsufficientCapacity);
        };
        let backend = pool.create(nsid, size).map_err(NsError::Backend)?;
        let live = backend.live_size();
        st.generation = st.generation.saturating_add(1);
        let created = st.generation;
        st.namespaces.push(Entry {
            nsid,
            lba_shift,
            shared,
            size,
            live,
            seed: self.created_seed(created),
            source: Source::Shared(SharedSource::new(backend)),
            attached: Vec::new(),
            pooled: size,
            created,
            added: false,
        });
        st.namespaces.sort_by_key(|e| e.nsid);
        st.recent = nsid;
        note(&mut st, tag, nsid);
        self.persist(&st);
        log::info!(
            "{}: namespace {nsid} created ({size} bytes, {}-byte blocks{})",
            self.nqn,
            1u32 << lba_shift,
            if shared { ", shareable" } else { "" }
        );
        Ok(nsid)
    }

    /// Delete namespace `nsid` (all with `u32::MAX`), detaching it from every controller
    /// first (§5.20, SEL 1). See [`Subsystem::attach`] for `me` and `wait`.
    pub fn delete(
        &self,
        nsid: u32,
        me: Option<u16>,
        wait: bool,
    ) -> Result<Vec<NamespaceChange>, NsError> {
        self.delete_tagged(nsid, me, wait, None)
    }

    /// [`Subsystem::delete`] by admin command `tag`.
    fn delete_tagged(
        &self,
        nsid: u32,
        me: Option<u16>,
        wait: bool,
        tag: Option<CommandTag>,
    ) -> Result<Vec<NamespaceChange>, NsError> {
        if !self.manages_namespaces() {
            return Err(NsError::Fixed);
        }
        let mut st = self.lock();
        // a replay before settling deletes only what the replay added (the rest is the
        // saved state's, which is newer)
        let replaying = waits_to_settle(&st);
        let targets: Vec<u32> = if nsid == u32::MAX {
            st.namespaces
                .iter()
                .filter(|e| e.added || !replaying)
                .map(|e| e.nsid)
                .collect()
        } else if let Some(e) = st.namespaces.iter().find(|e| e.nsid == nsid) {
            if replaying && !e.added {
                return Ok(Vec::new());
            }
            vec![nsid]
        } else if replaying {
            return Ok(Vec::new());
        } else {
            return Err(NsError::InvalidNamespace);
        };
        let mut changes = Changes::new();
        let mut backing = Vec::new();
        for n in targets {
            let Some(at) = st.namespaces.iter().position(|e| e.nsid == n) else {
                continue;
            };
            let e = st.namespaces.remove(at);
            changes.extend(e.attached.iter().map(|&c| (c, NamespaceChange::Detach(n))));
            if e.pooled > 0 {
                backing.push(n);
            }
            log::info!("{}: namespace {n} deleted", self.nqn);
        }
        st.recent = nsid;
        note(&mut st, tag, 0);
        // saved before the pool lets go of the blocks: a worker dying between the two leaves
        // the namespace deleted, never saved and unopenable
        self.persist(&st);
        if let Some(p) = st.pool.as_mut() {
            for n in backing {
                p.delete(n);
            }
        }
        Ok(self.commit(st, changes, me, wait))
    }

    /// The state, for an attach or detach: namespaces are managed and `ctrls` is a valid
    /// controller list.
    fn lock_for_attachment(
        &self,
        ctrls: &[u16],
    ) -> Result<std::sync::MutexGuard<'_, State>, NsError> {
        if !self.manages_namespaces() {
            return Err(NsError::Fixed);
        }
        let st = self.lock();
        check_list(&st, ctrls)?;
        Ok(st)
    }

    /// Attach namespace `nsid` to `ctrls` (§5.19, SEL 0). `me` is the controller running
    /// the command, if any; with `wait` (never on a reactor thread) this returns once every
    /// controller has applied the change. Returns the changes for `me` that it must apply
    /// itself (it has no reactor to receive them on: tests, fuzzing).
    pub fn attach(
        &self,
        nsid: u32,
        ctrls: &[u16],
        me: Option<u16>,
        wait: bool,
    ) -> Result<Vec<NamespaceChange>, NsError> {
        self.attach_tagged(nsid, ctrls, me, wait, None)
    }

    /// [`Subsystem::attach`] by admin command `tag`.
    fn attach_tagged(
        &self,
        nsid: u32,
        ctrls: &[u16],
        me: Option<u16>,
        wait: bool,
        tag: Option<CommandTag>,
    ) -> Result<Vec<NamespaceChange>, NsError> {
        let mut st = self.lock_for_attachment(ctrls)?;
        if waits_to_settle(&st) {
            return Ok(Vec::new());
        }
        let e = entry_mut(&mut st, nsid)?;
        if let Some(&c) = ctrls.iter().find(|c| e.attached.contains(c)) {
            return Err(NsError::AlreadyAttached(c));
        }
        if !e.shared && e.attached.len() + ctrls.len() > 1 {
            return Err(NsError::Private);
        }
        let Source::Shared(src) = &e.source else {
            return Err(NsError::Fixed);
        };
        let mut changes = Changes::new();
        for &c in ctrls {
            let h = src
                .handle()
                .ok_or_else(|| NsError::Backend("too many controllers on one backend".into()))?;
            changes.push((c, NamespaceChange::Attach(e.namespace(Box::new(h)))));
        }
        e.attached.extend_from_slice(ctrls);
        e.attached.sort_unstable();
        log::info!("{}: namespace {nsid} attached to {ctrls:x?}", self.nqn);
        st.recent = nsid;
        note(&mut st, tag, 0);
        self.persist(&st);
        Ok(self.commit(st, changes, me, wait))
    }

    /// Detach namespace `nsid` from `ctrls` (§5.19, SEL 1); as [`Subsystem::attach`].
    pub fn detach(
        &self,
        nsid: u32,
        ctrls: &[u16],
        me: Option<u16>,
        wait: bool,
    ) -> Result<Vec<NamespaceChange>, NsError> {
        self.detach_tagged(nsid, ctrls, me, wait, None)
    }

    /// [`Subsystem::detach`] by admin command `tag`.
    fn detach_tagged(
        &self,
        nsid: u32,
        ctrls: &[u16],
        me: Option<u16>,
        wait: bool,
        tag: Option<CommandTag>,
    ) -> Result<Vec<NamespaceChange>, NsError> {
        let mut st = self.lock_for_attachment(ctrls)?;
        if waits_to_settle(&st) {
            return Ok(Vec::new());
        }
        let e = entry_mut(&mut st, nsid)?;
        if let Some(&c) = ctrls.iter().find(|c| !e.attached.contains(c)) {
            return Err(NsError::NotAttached(c));
        }
        e.attached.retain(|c| !ctrls.contains(c));
        log::info!("{}: namespace {nsid} detached from {ctrls:x?}", self.nqn);
        let changes = ctrls
            .iter()
            .map(|&c| (c, NamespaceChange::Detach(nsid)))
            .collect();
        st.recent = nsid;
        note(&mut st, tag, 0);
        self.persist(&st);
        Ok(self.commit(st, changes, me, wait))
    }

    /// The identity seed of the `created`-th namespace created.
    fn created_seed(&self, created: u64) -> String {
        format!("{}#created{created}", self.nqn)
    }

    /// Under a supervisor: keep the namespaces in `journal` (the keeper controller's) from
    /// now on, and take what an earlier worker saved there for [`Subsystem::settle`]. Nothing
    /// is saved until then (the management plane's changes replayed meanwhile must not
    /// overwrite the newer saved state).
    pub fn keep_in(&self, journal: Journal) {
        let saved = journal.load_subsystem().and_then(|b| {
            let d = SavedNamespaces::decode(&b, MAX_NAMESPACES as usize);
            if d.is_none() {
                device_model::error_limited!(
                    "{}: saved namespaces unreadable (corrupt or another version): as configured",
                    self.nqn
                );
            }
            d
        });
        let mut st = self.lock();
        // nothing saved (a new subsystem, or an unreadable state): nothing newer to wait for,
        // the replay applies as it comes and every change is saved from now on
        let settled = saved.is_none();
        st.kept = Some(KeptIn {
            journal,
            saved,
            settled,
        });
        self.persist(&st);
    }

    /// Save the namespaces in the keeper's journal (once settled), before the change is
    /// answered: a worker that dies after answering leaves it to the next one.
    fn persist(&self, st: &State) {
        let Some(k) = st.kept.as_ref().filter(|k| k.settled) else {
            return;
        };
        let saved = SavedNamespaces {
            generation: st.generation,
            last: st.last,
            recent: st.recent,
            namespaces: st
                .namespaces
                .iter()
                .map(|e| SavedNamespace {
                    nsid: e.nsid,
                    lba_shift: e.lba_shift,
                    shared: e.shared,
                    size: e.size(),
                    pooled: e.pooled,
                    created: e.created,
                    ident: ident(&e.seed),
                    attached: e.attached.clone(),
                })
                .collect(),
        };
        if let Err(e) = k.journal.save_subsystem(&saved.encode()) {
            device_model::error_limited!("{}: namespaces not saved: {e}", self.nqn);
        }
    }

    /// A new worker, after the configuration is built and the management plane's changes
    /// are replayed, before any host is served again: put the namespaces back as the last
    /// worker saved them (what the guest changed with Namespace Management and Attachment:
    /// attachments, namespaces created from the pool, namespaces deleted). The controllers
    /// take the changes quietly (their hosts heard of them from that worker). From then on
    /// every change is saved. Without a saved state the namespaces stay as they are.
    pub fn settle(&self) -> Settled {
        let mut out = Settled::default();
        let mut st = self.lock();
        let Some(k) = st.kept.as_mut().filter(|k| !k.settled) else {
            return out;
        };
        k.settled = true;
        let Some(saved) = k.saved.take() else {
            self.persist(&st);
            return out;
        };
        let mut changes = Changes::new();
        // quietly, but for the NSID of the most recent change: it may have been saved and not
        // yet told to the hosts when the worker died (a second notice costs a rescan)
        let told = |n: u32| saved.recent == n || saved.recent == u32::MAX;
        let quiet_detach = |n: u32, ctrls: &[u16], changes: &mut Changes| {
            changes.extend(ctrls.iter().map(|&c| {
                let change = if told(n) {
                    NamespaceChange::Detach(n)
                } else {
                    NamespaceChange::Settle(SettleChange::Detach(n))
                };
                (c, change)
            }));
        };
        // namespaces deleted since they were configured or added
        let gone: Vec<u32> = st
            .namespaces
            .iter()
            .map(|e| e.nsid)
            .filter(|n| saved.namespaces.iter().all(|s| s.nsid != *n))
            .collect();
        for n in gone {
            if let Some(at) = st.namespaces.iter().position(|e| e.nsid == n) {
                let e = st.namespaces.remove(at);
                quiet_detach(n, &e.attached, &mut changes);
                out.removed += 1;
            }
        }
        for s in &saved.namespaces {
            let mut attached: Vec<u16> = s
                .attached
                .iter()
                .copied()
                .filter(|c| st.controllers.iter().any(|m| m.cntlid == *c))
                .collect();
            attached.sort_unstable();
            attached.dedup();
            // the same NSID with another origin now (added by a replayed call where the guest
            // had deleted that one and created this from the pool): the saved one is newer
            if let Some(at) = st.namespaces.iter().position(|e| {
                e.nsid == s.nsid
                    && (e.pooled != s.pooled
                        || e.created != s.created
                        || e.lba_shift != s.lba_shift
                        || ident(&e.seed) != s.ident)
            }) {
                let e = st.namespaces.remove(at);
                quiet_detach(e.nsid, &e.attached, &mut changes);
                out.removed += 1;
            }
            if !st.namespaces.iter().any(|e| e.nsid == s.nsid) {
                match self.reopen(&mut st, s) {
                    Ok(e) => {
                        st.namespaces.push(e);
                        out.reopened += 1;
                    }
                    Err(why) => {
                        device_model::error_limited!(
                            "{}: namespace {} not put back: {why}",
                            self.nqn,
                            s.nsid
                        );
                        out.lost += 1;
                        continue;
                    }
                }
            }
            let Some(e) = st.namespaces.iter_mut().find(|e| e.nsid == s.nsid) else {
                continue;
            };
            let leave: Vec<u16> = e
                .attached
                .iter()
                .copied()
                .filter(|c| !attached.contains(c))
                .collect();
            quiet_detach(e.nsid, &leave, &mut changes);
            out.detached += leave.len();
            let mut now: Vec<u16> = e
                .attached
                .iter()
                .copied()
                .filter(|c| attached.contains(c))
                .collect();
            for &c in attached.iter().filter(|c| !e.attached.contains(c)) {
                let Source::Shared(src) = &e.source else {
                    continue;
                };
                // only a controller that got its handle counts as attached
                let Some(h) = src.handle() else {
                    continue;
                };
                let ns = e.namespace(Box::new(h));
                let change = if told(e.nsid) {
                    NamespaceChange::Attach(ns)
                } else {
                    NamespaceChange::Settle(SettleChange::Attach(ns))
                };
                changes.push((c, change));
                now.push(c);
                out.attached += 1;
            }
            now.sort_unstable();
            e.attached = now;
        }
        st.namespaces.sort_by_key(|e| e.nsid);
        st.generation = st.generation.max(saved.generation);
        st.last = saved.last;
        st.recent = saved.recent;
        self.persist(&st);
        log::info!(
            "{}: namespaces as the last worker left them: {out:?}",
            self.nqn
        );
        self.commit(st, changes, None, true);
        out
    }

    /// The saved pool namespace `s`, opened again from the pool.
    fn reopen(&self, st: &mut State, s: &SavedNamespace) -> Result<Entry, String> {
        if s.pooled == 0 {
            return Err("it was added by the management plane, whose call did not replay".into());
        }
        if s.nsid == 0 || s.nsid > MAX_NAMESPACES || (s.lba_shift != 9 && s.lba_shift != 12) {
            return Err("saved with an impossible NSID or format".into());
        }
        let pool = st.pool.as_mut().ok_or("the subsystem has no pool")?;
        let backend = pool.reopen(s.nsid, s.size)?;
        Ok(Entry {
            nsid: s.nsid,
            lba_shift: s.lba_shift,
            shared: s.shared,
            size: s.size,
            live: backend.live_size(),
            seed: self.created_seed(s.created),
            source: Source::Shared(SharedSource::new(backend)),
            attached: Vec::new(),
            pooled: s.pooled,
            created: s.created,
            added: false,
        })
    }

    /// Hand `changes` to their controllers. Controllers on a reactor get them posted while
    /// the state is still locked, so each applies changes in the order they were made (the
    /// controller running the command too: its own change waits in the same queue, ahead of
    /// its next command). The changes for `me` when it has no reactor (tests, fuzzing) are
    /// returned for it to apply. With `wait`, return once every posted change is applied.
    fn commit(
        &self,
        st: std::sync::MutexGuard<'_, State>,
        changes: Changes,
        me: Option<u16>,
        wait: bool,
    ) -> Vec<NamespaceChange> {
        let (tx, rx) = mpsc::channel::<()>();
        let mut posted = 0;
        let mut mine = Vec::new();
        for (cntlid, change) in changes {
            let poster = st
                .controllers
                .iter()
                .find(|m| m.cntlid == cntlid)
                .and_then(|m| m.poster.clone());
            match poster {
                Some(p) => {
                    if p.post_change(change, Some(tx.clone())) {
                        posted += 1;
                    } else {
                        log::warn!("{}: controller {cntlid:#x} is gone", self.nqn);
                    }
                }
                None if me == Some(cntlid) => mine.push(change),
                None => log::warn!("{}: controller {cntlid:#x} not running", self.nqn),
            }
        }
        drop(st);
        drop(tx);
        if wait {
            for _ in 0..posted {
                if rx.recv_timeout(Duration::from_secs(30)).is_err() {
                    log::warn!("{}: a controller did not apply its change", self.nqn);
                    break;
                }
            }
        }
        mine
    }
}

impl NvmSubsystem for Subsystem {
    fn nqn(&self) -> &str {
        &self.nqn
    }
    fn manages_namespaces(&self) -> bool {
        Subsystem::manages_namespaces(self)
    }
    fn namespace(&self, nsid: u32) -> Option<SubsystemNamespace> {
        Subsystem::namespace(self, nsid)
    }
    fn controllers(&self) -> Vec<u16> {
        Subsystem::controllers(self)
    }
    fn attached(&self, nsid: u32) -> Option<Vec<u16>> {
        Subsystem::attached(self, nsid)
    }
    fn allocated(&self, after: u32) -> Vec<u32> {
        Subsystem::allocated(self, after)
    }
    fn max_nsid(&self) -> u32 {
        Subsystem::max_nsid(self)
    }
    fn max_namespaces(&self) -> u32 {
        MAX_NAMESPACES
    }
    fn capacity(&self) -> (u64, u64) {
        Subsystem::capacity(self)
    }
    fn create(
        &self,
        size: u64,
        lba_shift: u8,
        shared: bool,
        tag: Option<CommandTag>,
    ) -> Result<u32, NsError> {
        self.create_tagged(size, lba_shift, shared, tag)
    }
    fn delete(
        &self,
        nsid: u32,
        me: u16,
        tag: Option<CommandTag>,
    ) -> Result<Vec<NamespaceChange>, NsError> {
        self.delete_tagged(nsid, Some(me), false, tag)
    }
    fn attach(
        &self,
        nsid: u32,
        ctrls: &[u16],
        me: u16,
        tag: Option<CommandTag>,
    ) -> Result<Vec<NamespaceChange>, NsError> {
        self.attach_tagged(nsid, ctrls, Some(me), false, tag)
    }
    fn detach(
        &self,
        nsid: u32,
        ctrls: &[u16],
        me: u16,
        tag: Option<CommandTag>,
    ) -> Result<Vec<NamespaceChange>, NsError> {
        self.detach_tagged(nsid, ctrls, Some(me), false, tag)
    }
    fn applied(&self, tag: CommandTag) -> Option<u32> {
        self.lock()
            .last
            .filter(|(t, _)| *t == tag)
            .map(|(_, dw0)| dw0)
    }
}

/// Total and unallocated NVM capacity of `st` in bytes, as one capacity shared by the
/// namespaces configured at start and those created from the pool (a real SSD's TNVMCAP
/// and UNVMCAP): the total is the pool's (or the configured namespaces', if they are
/// larger; it never changes), and every namespace, configured or created, is taken from it
/// while it exists, so deleting any namespace gives its bytes back.
fn capacity_of(st: &State) -> (u64, u64) {
    let pool = st.pool.as_ref().map_or(0, |p| p.capacity());
    let total = pool.max(st.configured);
    let allocated: u64 = st.namespaces.iter().map(Entry::size).sum();
    (total, total.saturating_sub(allocated))
}

/// A namespace's identity seed, hashed (FNV-1a): saved to tell namespaces apart.
fn ident(seed: &str) -> u64 {
    seed.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A change made by admin command `tag` (none: the management plane's), answered with
/// `dw0`: saved with the change, so its second run after a crash answers the same.
fn note(st: &mut State, tag: Option<CommandTag>, dw0: u32) {
    if let Some(t) = tag {
        st.last = Some((t, dw0));
    }
}

/// Kept in a journal and not settled yet: the management plane's changes being replayed to
/// a new worker before it settles. Attachments and deletions are left to the saved state,
/// which is newer (namespaces added are not: the saved state cannot open their backends).
fn waits_to_settle(st: &State) -> bool {
    st.kept.as_ref().is_some_and(|k| !k.settled)
}

/// The allocated namespace `nsid`.
fn entry_mut(st: &mut State, nsid: u32) -> Result<&mut Entry, NsError> {
    st.namespaces
        .iter_mut()
        .find(|e| e.nsid == nsid)
        .ok_or(NsError::InvalidNamespace)
}

/// A controller list for attach/detach: not empty, no duplicates, every CNTLID ours.
fn check_list(st: &State, ctrls: &[u16]) -> Result<(), NsError> {
    if ctrls.is_empty() {
        return Err(NsError::ControllerListInvalid);
    }
    for (i, c) in ctrls.iter().enumerate() {
        if ctrls[..i].contains(c) || st.controllers.iter().all(|m| m.cntlid != *c) {
            return Err(NsError::ControllerListInvalid);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::MemoryPool;
    use device_model::backend::MallocBackend;

    fn two_controllers(pool: u64) -> Arc<Subsystem> {
        let s = Subsystem::new("nqn.test", Some(Box::new(MemoryPool { capacity: pool })));
        s.add_controller(1);
        s.add_controller(2);
        s
    }

    /// A pool whose namespaces outlive "the process" (as files or volumes do).
    struct LastingPool;

    impl NamespacePool for LastingPool {
        fn capacity(&self) -> u64 {
            64 << 20
        }
        fn create(&mut self, _: u32, size: u64) -> Result<Box<dyn Backend>, String> {
            Ok(Box::new(
                MallocBackend::new(size).map_err(|e| e.to_string())?,
            ))
        }
        fn reopen(&mut self, nsid: u32, size: u64) -> Result<Box<dyn Backend>, String> {
            self.create(nsid, size)
        }
        fn delete(&mut self, _: u32) {}
        fn describe(&self) -> String {
            "lasting".into()
        }
    }

    /// A worker's subsystem as configured: controllers 1 and 2, namespace 1 on both, kept in
    /// the journal on `state`.
    fn worker(state: &sys_util::SharedMemory) -> Arc<Subsystem> {
        let s = Subsystem::new("nqn.kept", Some(Box::new(LastingPool)));
        s.add_controller(1);
        s.add_controller(2);
        s.add_namespace(
            1,
            Box::new(MallocBackend::new(1 << 20).unwrap()),
            9,
            "c",
            &[1, 2],
        );
        let j = Journal::open(state.fd().try_clone_to_owned().unwrap()).unwrap();
        s.keep_in(j);
        s
    }

    /// What the guest changed (a namespace created from the pool and attached, a configured
    /// one detached from a controller, another created and deleted) comes back in the next
    /// worker, with the same identities; changes made before the next worker settles (the
    /// management plane's replay) do not overwrite the saved state.
    #[test]
    fn the_next_worker_settles_to_what_the_last_one_saved() {
        let state = Journal::create().unwrap();
        let first = worker(&state);
        assert_eq!(first.settle(), Settled::default(), "nothing saved yet");
        first.detach(1, &[2], None, false).unwrap();
        // the guest's commands, as the PF's admin queue tags them
        let tag = |seq: u32, opcode: u8| CommandTag {
            seq,
            sq_pos: seq,
            cid: 7,
            opcode,
        };
        let made = NvmSubsystem::create(&*first, 4 << 20, 12, true, Some(tag(1, 0x0d))).unwrap();
        assert_eq!(first.applied(tag(1, 0x0d)), Some(made));
        NvmSubsystem::attach(&*first, made, &[1, 2], 1, Some(tag(2, 0x15))).unwrap();
        let gone = first.create(1 << 20, 9, true).unwrap();
        first.delete(gone, None, false).unwrap();
        let ids = first.namespace(made).unwrap().ids;
        // the management plane: a volume added, deleted, another added under the same NSID
        let volume = || Box::new(MallocBackend::new(1 << 20).unwrap());
        let replay = |s: &Subsystem| {
            s.add_run_time_namespace(9, volume(), 9, "vol-a");
            s.delete(9, None, false).unwrap();
            s.add_run_time_namespace(9, volume(), 9, "vol-b");
        };
        replay(&first);

        let next = worker(&state);
        // a replayed change before settling: left to the saved state, not saved over it
        assert!(
            next.detach(1, &[1], None, false)
                .is_ok_and(|c| c.is_empty())
        );
        assert_eq!(next.attached(1), Some(vec![1, 2]));
        let third = worker(&state);
        replay(&third);
        let settled = third.settle();
        assert_eq!(
            settled,
            Settled {
                attached: 2,
                detached: 1,
                reopened: 1,
                removed: 0,
                lost: 0
            }
        );
        assert_eq!(third.attached(1), Some(vec![1]));
        assert_eq!(third.attached(made), Some(vec![1, 2]));
        assert_eq!(third.attached(gone), None);
        assert_eq!(
            third.namespace(9).unwrap().ids,
            NsIds::derive(9, "vol-b"),
            "the volume added last, not the first one under that NSID"
        );
        let again = third.namespace(made).unwrap();
        assert!(again.pooled && again.lba_shift == 12 && again.size == 4 << 20);
        assert_eq!(again.ids, ids, "a created namespace keeps its identity");
        // the next one created gets a fresh identity, not one given out before
        let fresh = third.create(1 << 20, 9, true).unwrap();
        assert_ne!(third.namespace(fresh).unwrap().ids, ids);
        assert_eq!(third.settle(), Settled::default(), "settles once");
        // the last command's change was saved with it: its second run (the worker died
        // before completing it) is recognised, an earlier or another one is not
        assert_eq!(third.applied(tag(2, 0x15)), Some(0));
        assert_eq!(third.applied(tag(1, 0x0d)), None);
        assert_eq!(third.applied(tag(2, 0x0d)), None);
    }

    #[test]
    fn capacity_is_accounted_and_refusals_have_their_codes() {
        let s = two_controllers(8 << 20);
        assert_eq!(s.capacity(), (8 << 20, 8 << 20));
        let a = s.create(4 << 20, 12, true).unwrap();
        assert_eq!(a, 1);
        assert_eq!(s.capacity(), (8 << 20, 4 << 20));
        assert_eq!(
            s.create(8 << 20, 12, true),
            Err(NsError::InsufficientCapacity)
        );
        assert_eq!(s.create(4096, 10, true), Err(NsError::InvalidFormat));
        assert_eq!(s.create(1000, 9, true), Err(NsError::InvalidField));
        let b = s.create(4 << 20, 9, false).unwrap();
        assert_eq!(b, 2);
        // private: one controller only
        assert!(s.attach(b, &[1], None, false).is_ok());
        assert_eq!(s.attach(b, &[2], None, false).err(), Some(NsError::Private));
        assert_eq!(
            s.attach(b, &[1], None, false).err(),
            Some(NsError::AlreadyAttached(1))
        );
        assert_eq!(
            s.attach(a, &[1, 1], None, false).err(),
            Some(NsError::ControllerListInvalid)
        );
        assert_eq!(
            s.attach(a, &[9], None, false).err(),
            Some(NsError::ControllerListInvalid)
        );
        assert_eq!(
            s.attach(a, &[], None, false).err(),
            Some(NsError::ControllerListInvalid)
        );
        assert_eq!(
            s.attach(7, &[1], None, false).err(),
            Some(NsError::InvalidNamespace)
        );
        assert_eq!(
            s.detach(a, &[2], None, false).err(),
            Some(NsError::NotAttached(2))
        );
        // no controller runs here: the state changes, nothing is delivered
        assert_eq!(s.attach(a, &[1, 2], None, false).map(|m| m.len()), Ok(0));
        assert_eq!(s.attached(a), Some(vec![1, 2]));
        assert_eq!(s.allocated(0), vec![1, 2]);
        assert_eq!(s.allocated(1), vec![2]);
        // delete detaches from everyone and frees the capacity and the NSID
        assert_eq!(s.delete(a, None, false).map(|m| m.len()), Ok(0));
        assert_eq!(s.attached(a), None);
        assert_eq!(s.capacity(), (8 << 20, 4 << 20));
        assert_eq!(s.create(1 << 20, 12, true), Ok(1));
        assert_eq!(NsError::Private.status().raw(), 0x4119);
    }

    #[test]
    fn configured_and_created_namespaces_share_one_capacity() {
        let s = two_controllers(8 << 20);
        let b = MallocBackend::new(2 << 20).unwrap();
        s.add_namespace(1, Box::new(b), 9, "seed", &[1]);
        assert_eq!(s.capacity(), (8 << 20, 6 << 20), "TNVMCAP counts it once");
        assert_eq!(
            s.create(7 << 20, 9, true),
            Err(NsError::InsufficientCapacity)
        );
        assert!(s.delete(1, None, false).is_ok());
        assert_eq!(s.capacity(), (8 << 20, 8 << 20), "its capacity comes back");
        assert_eq!(s.create(8 << 20, 9, true), Ok(1), "all of TNVMCAP");
        assert_eq!(s.capacity(), (8 << 20, 0));
    }

    #[test]
    fn one_controller_without_a_pool_keeps_its_namespaces_fixed() {
        let s = Subsystem::new("nqn.test", None);
        s.add_controller(1);
        s.add_namespace(
            1,
            Box::new(MallocBackend::new(1 << 20).unwrap()),
            9,
            "x",
            &[1],
        );
        assert!(!s.manages_namespaces());
        assert_eq!(s.max_nsid(), 1);
        assert_eq!(s.namespaces_for(1).len(), 1);
        assert_eq!(s.create(1 << 20, 9, true), Err(NsError::Fixed));
        assert_eq!(s.detach(1, &[1], None, false).err(), Some(NsError::Fixed));
    }

    #[test]
    fn recreated_namespaces_get_new_identities() {
        let s = two_controllers(4 << 20);
        let n = s.create(1 << 20, 9, true).unwrap();
        let first = s.namespace(n).unwrap().ids;
        s.delete(n, None, false).unwrap();
        let m = s.create(1 << 20, 9, true).unwrap();
        assert_eq!(n, m);
        assert_ne!(s.namespace(m).unwrap().ids, first);
    }
}
