//! Management operations on a store: each checks its arguments, records its change and
//! commits before it returns (a management change is durable when acknowledged).

use device_model::backend::IoOp;

use super::error::{LvolError, Result};
use super::meta::{MAX_VOLUME_CLUSTERS, check_name};
use super::records::Record;
use super::store::Core;

/// A volume as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Thin provisioned.
    pub thin: bool,
    /// A snapshot (read-only).
    pub snapshot: bool,
    /// Parent snapshot's name, if any.
    pub parent: Option<String>,
    /// Bytes of clusters it maps.
    pub used: u64,
    /// Bytes of those clusters shared with another volume.
    pub shared: u64,
    /// Clones (volumes whose parent it is).
    pub clones: Vec<String>,
    /// Open by a namespace.
    pub open: bool,
}

impl Core {
    pub(crate) fn id_of(&self, name: &str) -> Result<u32> {
        self.meta
            .by_name(name)
            .map(|v| v.id)
            .ok_or_else(|| LvolError::NotFound(name.into()))
    }

    fn check_new_name(&self, name: &str) -> Result<()> {
        check_name(name)?;
        if self.meta.by_name(name).is_some() {
            return Err(LvolError::Exists(name.into()));
        }
        Ok(())
    }

    fn check_size(&self, size: u64) -> Result<()> {
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(LvolError::Invalid(format!(
                "size {size}: a positive multiple of 4096 bytes"
            )));
        }
        let n = size.div_ceil(self.geo.cluster_size);
        if n > self.geo.clusters.saturating_mul(64) || n > MAX_VOLUME_CLUSTERS {
            return Err(LvolError::Invalid(format!(
                "size {size}: at most 64 times the store's capacity and {MAX_VOLUME_CLUSTERS} clusters"
            )));
        }
        Ok(())
    }

    /// Room in memory for `n` more map entries (a snapshot or clone copies a whole map).
    fn room(&self, n: usize) -> Result<()> {
        if self.meta.entries + n as u64 > self.meta.max_entries() {
            return Err(LvolError::Invalid(format!(
                "the store's maps would hold more than {} entries",
                self.meta.max_entries()
            )));
        }
        Ok(())
    }

    fn in_use(&self, id: u32) -> bool {
        self.open.get(&id).copied().unwrap_or(0) > 0
    }

    /// Map logical clusters `from..to` of thick volume `id` to zeroed new clusters.
    fn map_thick(&mut self, id: u32, from: u32, to: u32) -> Result<()> {
        let want = (to - from) as usize;
        if want > self.free.len() {
            self.reclaim()?;
            self.apply_deferred();
        }
        if want > self.free.len() {
            return Err(LvolError::NoSpace(format!(
                "{want} clusters needed, {} free",
                self.free.len()
            )));
        }
        // lowest clusters first, in runs
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        let mut l = from;
        while l < to {
            let p = self
                .alloc()
                .ok_or_else(|| LvolError::NoSpace("thick".into()))?;
            let mut n = 1u32;
            while l + n < to && self.free.last() == Some(&(p + n)) {
                self.alloc();
                n += 1;
            }
            let cs = self.geo.cluster_size;
            let len = u64::from(n) * cs;
            self.sync.run(
                self.base.as_mut(),
                "zero new clusters",
                IoOp::WriteZeroes { len },
                self.geo.cluster_at(p),
                None,
                len,
            )?;
            self.push_record(Record::MapRun {
                id,
                lcluster: l,
                pcluster: p,
                count: n,
            })?;
            l += n;
        }
        Ok(())
    }

    /// Create a volume.
    pub(crate) fn create(&mut self, name: &str, size: u64, thin: bool) -> Result<()> {
        self.check_alive()?;
        self.check_new_name(name)?;
        self.check_size(size)?;
        let n = size.div_ceil(self.geo.cluster_size);
        self.room(n as usize)?;
        if !thin && n > (self.free.len() + self.pending_free.len() + self.quarantine.len()) as u64 {
            return Err(LvolError::NoSpace(format!(
                "a thick volume of {n} clusters, {} free",
                self.free.len()
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.push_record(Record::Create {
            id,
            name: name.into(),
            size,
            thin,
        })?;
        if !thin && let Err(e) = self.map_thick(id, 0, n as u32) {
            // undo: nothing of it was committed
            self.push_record(Record::Delete { id })?;
            self.rederive_refs();
            self.commit()?;
            return Err(e);
        }
        self.commit()
    }

    /// Delete a volume or snapshot (not while open). Its clones keep their data (shared
    /// clusters are counted), their parent becomes its parent.
    pub(crate) fn delete(&mut self, name: &str) -> Result<()> {
        self.check_alive()?;
        let id = self.id_of(name)?;
        if self.in_use(id) {
            return Err(LvolError::InUse(name.into()));
        }
        self.check_not_privatizing(id)?;
        self.push_record(Record::Delete { id })?;
        self.rederive_refs();
        self.commit()
    }

    /// Resize a volume (a shrink only while it is not open; its clusters beyond the new
    /// end return to the store).
    pub(crate) fn resize(&mut self, name: &str, size: u64) -> Result<()> {
        self.check_alive()?;
        self.check_size(size)?;
        let id = self.id_of(name)?;
        self.check_not_privatizing(id)?;
        let v = &self.meta.volumes[&id];
        if v.read_only {
            return Err(LvolError::Invalid(format!(
                "{name} is a snapshot: read-only"
            )));
        }
        let (old, thin) = (v.size, v.thin);
        if size < old && self.in_use(id) {
            return Err(LvolError::InUse(format!("{name} (shrink)")));
        }
        let from = old.div_ceil(self.geo.cluster_size) as u32;
        let to = size.div_ceil(self.geo.cluster_size) as u32;
        self.room(to.saturating_sub(from) as usize)?;
        if !thin
            && to > from
            && (to - from) as usize
                > self.free.len() + self.pending_free.len() + self.quarantine.len()
        {
            return Err(LvolError::NoSpace(format!(
                "{} more clusters, {} free",
                to - from,
                self.free.len()
            )));
        }
        // a partial last cluster that grows must read zeroes beyond the old end
        if size > old && !old.is_multiple_of(self.geo.cluster_size) {
            let l = from - 1;
            if self.meta.volumes[&id].map[l as usize].is_mapped() {
                let coff = old % self.geo.cluster_size;
                let n = self.geo.cluster_size - coff;
                self.zero_tail(id, l, coff, n)?;
            }
        }
        self.push_record(Record::Resize { id, size })?;
        if let Some(s) = self.sizes.get(&id) {
            s.store(size, std::sync::atomic::Ordering::Relaxed);
        }
        if !thin && to > from {
            self.map_thick(id, from, to)?;
        }
        self.rederive_refs();
        self.commit()
    }

    /// Zero bytes of an entry beyond a volume's old end, synchronously.
    fn zero_tail(&mut self, id: u32, l: u32, coff: u64, n: u64) -> Result<()> {
        let top = self
            .writable_top(id, l)
            .map_err(|_| LvolError::NoSpace("a cluster for a resize".into()))?;
        if !coff.is_multiple_of(self.geo.granule) {
            self.prefill(id, l, (coff / self.geo.granule) as u32)
                .map_err(|s| LvolError::Io {
                    what: "resize",
                    status: s.raw(),
                })?;
        }
        self.sync.run(
            self.base.as_mut(),
            "zero a cluster's tail",
            IoOp::WriteZeroes { len: n },
            self.geo.cluster_at(top) + coff,
            None,
            n,
        )?;
        let g0 = (coff / self.geo.granule) as u32;
        self.set_valid(id, l, top, g0, self.geo.granules());
        Ok(())
    }

    /// Rename.
    pub(crate) fn rename(&mut self, name: &str, new: &str) -> Result<()> {
        self.check_alive()?;
        let id = self.id_of(name)?;
        self.check_new_name(new)?;
        self.push_record(Record::Rename {
            id,
            name: new.into(),
        })?;
        self.commit()
    }

    /// Snapshot `name` as `snap` (instant: the map is copied, clusters shared).
    pub(crate) fn snapshot(&mut self, name: &str, snap: &str) -> Result<()> {
        self.check_alive()?;
        let src = self.id_of(name)?;
        self.check_not_privatizing(src)?;
        self.check_new_name(snap)?;
        if self.meta.volumes[&src].read_only {
            return Err(LvolError::Invalid(format!("{name} is a snapshot already")));
        }
        self.room(self.meta.volumes[&src].map.len())?;
        let id = self.next_id;
        self.next_id += 1;
        self.push_record(Record::Snapshot {
            src,
            id,
            name: snap.into(),
        })?;
        self.rederive_refs();
        self.commit()
    }

    /// Clone snapshot `snap` as writable volume `name`.
    pub(crate) fn clone_snapshot(&mut self, snap: &str, name: &str) -> Result<()> {
        self.check_alive()?;
        let s = self.id_of(snap)?;
        self.check_new_name(name)?;
        if !self.meta.volumes[&s].read_only {
            return Err(LvolError::Invalid(format!(
                "{snap} is not a snapshot (clone a snapshot)"
            )));
        }
        self.room(self.meta.volumes[&s].map.len())?;
        let id = self.next_id;
        self.next_id += 1;
        self.push_record(Record::Clone {
            snap: s,
            id,
            name: name.into(),
        })?;
        self.rederive_refs();
        self.commit()
    }

    /// Start giving volume `name` its own copy of every cluster it shares (`thick`: of
    /// every cluster, unmapped ones too: inflate), done in steps
    /// ([`Core::make_independent_step`]) so that the store's other volumes get the lock in
    /// between; until [`Core::end_independent`] the volume cannot be deleted, resized or
    /// snapshotted. Returns its id.
    pub(crate) fn begin_independent(&mut self, name: &str, thick: bool) -> Result<u32> {
        self.check_alive()?;
        let id = self.id_of(name)?;
        if self.meta.volumes[&id].read_only {
            return Err(LvolError::Invalid(format!(
                "{name} is a snapshot: read-only"
            )));
        }
        self.check_not_privatizing(id)?;
        self.wait_idle();
        self.make_room_to_privatize(id, thick)?;
        self.privatizing.insert(id);
        Ok(id)
    }

    /// Make entries of `id` private from entry `from` on, until `budget` has passed (one
    /// entry at least): the entry to go on from, or `None` when all are.
    pub(crate) fn make_independent_step(
        &mut self,
        id: u32,
        thick: bool,
        from: u32,
        budget: std::time::Duration,
    ) -> Result<Option<u32>> {
        self.check_alive()?;
        // writes in flight to an entry must land before it is copied (data path requests
        // ran while the lock was free)
        self.wait_idle();
        let t = std::time::Instant::now();
        let n = self.meta.volumes[&id].map.len() as u32;
        let mut l = from;
        while l < n {
            self.privatize_entry(id, l, thick)?;
            l += 1;
            if t.elapsed() >= budget {
                break;
            }
        }
        Ok((l < n).then_some(l))
    }

    /// Finish what [`Core::begin_independent`] started: on success the volume no longer
    /// depends on its parent; on failure what was copied is kept (and recorded).
    pub(crate) fn end_independent(
        &mut self,
        id: u32,
        thick: bool,
        steps: Result<()>,
    ) -> Result<()> {
        self.privatizing.remove(&id);
        if let Err(e) = steps {
            self.commit()?;
            return Err(e);
        }
        self.push_record(Record::Decouple { id, thick })?;
        self.rederive_refs();
        self.commit()
    }

    /// Refuse what an inflate or decouple of `id` under way does not allow.
    pub(crate) fn check_not_privatizing(&self, id: u32) -> Result<()> {
        if self.privatizing.contains(&id) {
            let name = self.meta.volumes.get(&id).map_or("?", |v| v.name.as_str());
            return Err(LvolError::InUse(format!(
                "{name}: an inflate or decouple is under way"
            )));
        }
        Ok(())
    }

    /// Every volume, by name.
    pub(crate) fn list(&self) -> Vec<VolumeInfo> {
        let cs = self.geo.cluster_size;
        let mut out: Vec<VolumeInfo> = self
            .meta
            .volumes
            .values()
            .map(|v| {
                let mut used = 0u64;
                let mut shared = 0u64;
                for e in &v.map {
                    if e.is_mapped() {
                        used += cs;
                        if e.clusters().any(|c| self.refs[c as usize] > 1) {
                            shared += cs;
                        }
                    }
                }
                VolumeInfo {
                    name: v.name.clone(),
                    size: v.size,
                    thin: v.thin,
                    snapshot: v.read_only,
                    parent: self.meta.volumes.get(&v.parent).map(|p| p.name.clone()),
                    used,
                    shared,
                    clones: self
                        .meta
                        .volumes
                        .values()
                        .filter(|c| c.parent == v.id && !c.read_only)
                        .map(|c| c.name.clone())
                        .collect(),
                    open: self.in_use(v.id),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Bytes mapped by volume `id` (for NUSE).
    pub(crate) fn used_bytes(&self, id: u32) -> u64 {
        self.meta.volumes.get(&id).map_or(0, |v| {
            v.map.iter().filter(|e| e.is_mapped()).count() as u64 * self.geo.cluster_size
        })
    }
}
