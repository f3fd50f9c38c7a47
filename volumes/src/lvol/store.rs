//! The store's core: the base backend, the superblock, the metadata in memory, reference
//! counts and the free map derived from it, and the commit that makes changes durable.
//!
//! Ordering of a commit (guest Flush, FUA write, management change, store load):
//! 1. flush the base: data written before is durable;
//! 2. append the pending records as one batch on fresh journal blocks, flush;
//! 3. only then are clusters freed by those records handed out again.
//!
//! A record therefore never points at data that is not durable, and a cluster is never
//! given to a second owner while the first owner's claim could still come back at load:
//! a crash can leak a cluster (allocated, never recorded), never allocate one twice. When
//! the journal is full (and at every load) the whole metadata is written as a checkpoint
//! to the inactive slot and the two superblock copies are updated one after the other.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Instant;

use device_model::backend::{Backend, IoBuffer, IoOp};

use super::checkpoint;
use super::commit_plan::Commit;
use super::error::{LvolError, Result};
use super::inflight::{DataPath, Fill, Parked, Stalled};
use super::meta::Meta;
use super::records::{self, Record, ScanEnd};
use super::superblock::{Geometry, SB_SIZE, Superblock};
use super::syncio::SyncIo;

/// Deliberate faults, to show the crash tests catch them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Skip the flush that makes data durable before the records that point at it, when
    /// there are records to write (data and records then share one flush).
    pub records_before_data: bool,
}

/// What a load found.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Superblock generation used.
    pub generation: u64,
    /// A superblock copy that was not used, and why.
    pub bad_copies: Vec<String>,
    /// Journal records replayed after the checkpoint.
    pub replayed: usize,
    /// Volumes.
    pub volumes: usize,
    /// Mapped entries over all volumes.
    pub mapped: u64,
    /// Milliseconds the load took.
    pub millis: u128,
}

/// The store's state; all of it behind one lock.
pub struct Core {
    /// The base backend.
    pub(crate) base: Box<dyn Backend>,
    /// Current superblock.
    pub(crate) sb: Superblock,
    /// Layout.
    pub(crate) geo: Geometry,
    /// Volumes and maps.
    pub(crate) meta: Meta,
    /// References per physical cluster.
    pub(crate) refs: Vec<u32>,
    /// Clusters free to allocate (popped from the end).
    pub(crate) free: Vec<u32>,
    /// Clusters whose last reference went, not yet committed as such.
    pub(crate) pending_free: Vec<u32>,
    /// Committed free, but base requests started before may still read or write them.
    pub(crate) quarantine: Vec<u32>,
    /// Records not yet written.
    pub(crate) records: Vec<Record>,
    /// Entries changed by the data path, recorded at the next commit.
    pub(crate) dirty: BTreeSet<(u32, u32)>,
    pub(crate) journal_pos: u64,
    pub(crate) next_seq: u64,
    pub(crate) next_id: u32,
    pub(crate) sync: SyncIo,
    /// The commit in progress (`commit.rs`).
    pub(crate) job: Option<Box<Commit>>,
    /// Counts commit steps (their tags).
    pub(crate) commit_seq: u64,
    /// Why the last commit failed, for a caller waiting for it.
    pub(crate) commit_error: Option<LvolError>,
    /// Set when a metadata write failed: no more changes.
    pub(crate) failed: Option<String>,
    /// Guest requests in flight, handles.
    pub(crate) dp: DataPath,
    /// Data writes and reads in flight per physical cluster (`fill.rs` waits for an
    /// entry's writes to land; a quarantined cluster for both).
    pub(crate) cluster_writes: Vec<u32>,
    pub(crate) cluster_reads: Vec<u32>,
    /// A quarantined cluster may have gone idle.
    pub(crate) quarantine_due: bool,
    /// Writes waiting for clusters to be freed (`space.rs`), and whether some were.
    pub(crate) parked: Vec<Parked>,
    pub(crate) space_due: bool,
    /// A commit is wanted with no request waiting for it (to free clusters).
    pub(crate) commit_wanted: bool,
    /// Pieces of guest writes waiting for a fill, fills running, and per entry how many.
    pub(crate) stalled: Vec<Stalled>,
    pub(crate) fills: Vec<Fill>,
    pub(crate) filling: HashMap<(u32, u32), u32>,
    /// Something stalled pieces waited for completed.
    pub(crate) retry_due: bool,
    /// Open handles per volume id.
    pub(crate) open: HashMap<u32, usize>,
    /// Volumes an inflate or decouple is making independent, step by step.
    pub(crate) privatizing: std::collections::HashSet<u32>,
    /// Sizes of open volumes, read by their handles without the lock (every I/O's range
    /// check asks).
    pub(crate) sizes: HashMap<u32, Arc<AtomicU64>>,
    /// Deliberate faults (tests).
    pub(crate) faults: Faults,
    /// Percent of clusters in use at which a warning is logged.
    pub(crate) threshold: u8,
    /// Commit a request's mapping changes before acknowledging it (see
    /// [`super::Store::set_mappings_before_ack`]).
    pub(crate) mappings_before_ack: bool,
    /// The store's free percent while over the threshold, [`NO_WARNING`] otherwise; the
    /// volumes' handles read it without the lock.
    pub(crate) warning: Arc<AtomicU8>,
}

/// No capacity warning.
pub(crate) const NO_WARNING: u8 = u8::MAX;

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("name", &self.sb.name)
            .field("volumes", &self.meta.volumes.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Core {
    /// The store's last handle went (daemon stopping, store deleted): what the data path
    /// changed since the last commit is committed, as a Flush would (best effort: a base
    /// that failed already is left alone).
    fn drop(&mut self) {
        let pending = !self.records.is_empty() || !self.dirty.is_empty();
        if pending && self.failed.is_none() {
            self.wait_idle();
            if let Err(e) = self.commit() {
                log::warn!("volume store {}: the last commit: {e}", self.sb.name);
            }
        }
    }
}

/// Read `len` bytes at `off` of `base` into a new vector.
pub(crate) fn read_bytes(
    base: &mut dyn Backend,
    sync: &mut SyncIo,
    what: &'static str,
    off: u64,
    len: u64,
) -> Result<Vec<u8>> {
    let buf = IoBuffer::new(len as usize);
    sync.run(base, what, IoOp::Read, off, Some((&buf, 0)), len)?;
    let mut out = vec![0u8; len as usize];
    buf.read_at(0, &mut out);
    Ok(out)
}

/// The metadata a store on `base` holds, read without writing anything: superblock,
/// checkpoint, journal replayed.
pub(crate) fn read_store(
    base: &mut dyn Backend,
    sync: &mut SyncIo,
) -> Result<(Superblock, Meta, u64, u64, LoadReport)> {
    let t = Instant::now();
    if base.size() < 2 * SB_SIZE as u64 {
        return Err(LvolError::NoStore(
            "the backend is smaller than two superblocks".into(),
        ));
    }
    let head = read_bytes(base, sync, "read the superblocks", 0, 2 * SB_SIZE as u64)?;
    let (sb, problems) = Superblock::pick(&head[..SB_SIZE], &head[SB_SIZE..])?;
    let g = sb.geometry.clone();
    if base.size() < g.base_size {
        return Err(LvolError::TooSmall(format!(
            "the backend has {} bytes, the store was made on {}",
            base.size(),
            g.base_size
        )));
    }
    // whole blocks (a base may take only aligned requests), the image's bytes kept
    let mut ck = read_bytes(
        base,
        sync,
        "read the checkpoint",
        g.ckpt_off[sb.active as usize],
        sb.ckpt_bytes.div_ceil(4096) * 4096,
    )?;
    ck.truncate(sb.ckpt_bytes as usize);
    if crc32c::crc32c(&ck) != sb.ckpt_crc {
        return Err(LvolError::corrupt("checkpoint CRC mismatch"));
    }
    let mut meta = checkpoint::decode(&ck, g.cluster_size, g.clusters, g.granules())?;
    let area = read_bytes(base, sync, "read the journal", g.journal_off, g.journal_len)?;
    let salt = salt(&sb.uuid);
    let (recs, pos, end) = records::scan(&area, sb.journal_seq, salt, g.clusters, g.granules())?;
    for (i, r) in recs.iter().enumerate() {
        meta.apply(r)
            .map_err(|e| LvolError::corrupt(format!("journal record {i}: {e}")))?;
    }
    if end == ScanEnd::AreaEnd {
        log::debug!("volume store {}: the journal was full", sb.name);
    }
    let report = LoadReport {
        generation: sb.generation,
        bad_copies: problems.into_iter().flatten().collect(),
        replayed: recs.len(),
        volumes: meta.volumes.len(),
        mapped: meta.volumes.values().map(|v| v.mapped() as u64).sum(),
        millis: t.elapsed().as_millis(),
    };
    let next_seq = sb.journal_seq + recs.len() as u64;
    Ok((sb, meta, pos, next_seq, report))
}

/// The CRC seed of a store's journal records (records of another store on the same
/// backend never pass).
pub(crate) fn salt(uuid: &[u8; 16]) -> u32 {
    crc32c::crc32c(uuid)
}

impl Core {
    fn new(base: Box<dyn Backend>, sb: Superblock, meta: Meta) -> Self {
        let geo = sb.geometry.clone();
        let clusters = geo.clusters as usize;
        let mut core = Self {
            base,
            sb,
            geo,
            meta,
            refs: Vec::new(),
            free: Vec::new(),
            pending_free: Vec::new(),
            quarantine: Vec::new(),
            records: Vec::new(),
            dirty: BTreeSet::new(),
            journal_pos: 0,
            next_seq: 0,
            next_id: 1,
            sync: SyncIo::default(),
            job: None,
            commit_seq: 0,
            commit_error: None,
            failed: None,
            dp: DataPath::default(),
            cluster_writes: vec![0; clusters],
            cluster_reads: vec![0; clusters],
            quarantine_due: false,
            parked: Vec::new(),
            space_due: false,
            commit_wanted: false,
            stalled: Vec::new(),
            fills: Vec::new(),
            filling: HashMap::new(),
            retry_due: false,
            open: HashMap::new(),
            privatizing: std::collections::HashSet::new(),
            sizes: HashMap::new(),
            faults: Faults::default(),
            threshold: 90,
            mappings_before_ack: false,
            warning: Arc::new(AtomicU8::new(NO_WARNING)),
        };
        core.derive();
        core
    }

    /// Reference counts and the free list from the maps (lowest clusters handed out first).
    pub(crate) fn derive(&mut self) {
        self.refs = self.meta.refcounts();
        self.free = (0..self.geo.clusters as u32)
            .rev()
            .filter(|&c| self.refs[c as usize] == 0)
            .collect();
        self.next_id = self.next_id.max(self.meta.next_id());
    }

    /// Make a store on `base`.
    pub(crate) fn format(
        base: Box<dyn Backend>,
        name: &str,
        cluster_size: u64,
        journal_len: Option<u64>,
    ) -> Result<Self> {
        if name.is_empty() || name.len() > super::superblock::MAX_NAME {
            return Err(LvolError::Invalid(format!(
                "bad store name {name:?}: 1 to {} bytes",
                super::superblock::MAX_NAME
            )));
        }
        let geo = Geometry::plan(base.size(), cluster_size, journal_len)?;
        let sb = Superblock {
            incompat: 0,
            compat: 0,
            generation: 0,
            uuid: crate::raid::superblock::new_uuid(),
            name: name.into(),
            geometry: geo.clone(),
            active: 1,
            ckpt_bytes: 0,
            ckpt_crc: 0,
            journal_seq: 0,
        };
        let meta = Meta::new(geo.cluster_size, geo.clusters, geo.granules());
        let mut core = Self::new(base, sb, meta);
        core.checkpoint()?;
        Ok(core)
    }

    /// Load the store on `base`; writes a fresh checkpoint (compacting the journal).
    pub(crate) fn load(mut base: Box<dyn Backend>) -> Result<(Self, LoadReport)> {
        let mut sync = SyncIo::default();
        let (sb, meta, pos, next_seq, mut report) = read_store(base.as_mut(), &mut sync)?;
        let t = Instant::now();
        let mut core = Self::new(base, sb, meta);
        core.journal_pos = pos;
        core.next_seq = next_seq;
        core.checkpoint()?;
        report.millis += t.elapsed().as_millis();
        Ok((core, report))
    }

    pub(crate) fn fail(&mut self, e: LvolError) -> LvolError {
        log::error!(
            "volume store {}: {e}; it takes no more changes",
            self.sb.name
        );
        self.failed = Some(e.to_string());
        e
    }

    /// Refuse changes once a metadata write failed.
    pub(crate) fn check_alive(&self) -> Result<()> {
        match &self.failed {
            Some(why) => Err(LvolError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    /// Queue a management record: the data path's changed entries go first (the record
    /// may copy them, a snapshot does), then it is applied to the metadata.
    pub(crate) fn push_record(&mut self, r: Record) -> Result<()> {
        self.drain_dirty();
        self.meta.apply(&r)?;
        self.records.push(r);
        Ok(())
    }

    pub(crate) fn drain_dirty(&mut self) {
        for (id, l) in std::mem::take(&mut self.dirty) {
            if let Some(e) = self
                .meta
                .volumes
                .get(&id)
                .and_then(|v| v.map.get(l as usize))
            {
                self.records.push(Record::SetEntry {
                    id,
                    lcluster: l,
                    entry: e.clone(),
                });
            }
        }
    }

    /// Percent of clusters referenced or not yet reusable.
    pub(crate) fn used_percent(&self) -> u8 {
        let c = self.geo.clusters.max(1);
        ((c - self.free.len() as u64) * 100 / c) as u8
    }

    /// Take a free cluster.
    pub(crate) fn alloc(&mut self) -> Option<u32> {
        let c = self.free.pop()?;
        self.refs[c as usize] = 1;
        self.update_warning();
        Some(c)
    }

    /// Raise or clear the capacity warning by the threshold (logged when it changes).
    pub(crate) fn update_warning(&mut self) {
        let used = self.used_percent();
        let was = self.warning.load(Ordering::Relaxed);
        let now = if used >= self.threshold {
            100 - used
        } else {
            NO_WARNING
        };
        if now != was {
            self.warning.store(now, Ordering::Relaxed);
            if was == NO_WARNING {
                log::warn!(
                    "volume store {}: {used} % of its clusters are in use ({} free), over the warning threshold of {} %",
                    self.sb.name,
                    self.free.len(),
                    self.threshold
                );
            } else if now == NO_WARNING {
                log::info!(
                    "volume store {}: back under its warning threshold",
                    self.sb.name
                );
            }
        }
    }

    /// Drop a reference; the cluster's last one frees it (after the next commit).
    pub(crate) fn unref(&mut self, c: u32) {
        if let Some(r) = self.refs.get_mut(c as usize) {
            *r = r.saturating_sub(1);
            if *r == 0 {
                self.pending_free.push(c);
            }
        }
    }

    /// Make freed clusters reusable now: wait for data requests in flight, commit.
    pub(crate) fn reclaim(&mut self) -> Result<()> {
        if self.pending_free.is_empty() && self.quarantine.is_empty() {
            return Ok(());
        }
        self.wait_idle();
        self.commit()
    }

    /// Recompute reference counts after a management change; clusters it released wait
    /// for the commit.
    pub(crate) fn rederive_refs(&mut self) {
        let new = self.meta.refcounts();
        for (c, (&old, &now)) in self.refs.iter().zip(&new).enumerate() {
            if old > 0 && now == 0 {
                self.pending_free.push(c as u32);
            }
        }
        self.refs = new;
    }

    /// Bytes the metadata takes in a checkpoint now, and the slot size.
    pub(crate) fn metadata_use(&self) -> (u64, u64) {
        (
            checkpoint::encode(&self.meta).len() as u64,
            self.geo.ckpt_len,
        )
    }
}
