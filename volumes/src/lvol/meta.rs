//! The store's metadata in memory: volumes and their maps. Records apply here, at load
//! (replay) and at run time (the same function), so the two cannot disagree. Reference
//! counts and the free map are not stored: they are derived from the maps.

use std::collections::BTreeMap;

use super::error::{LvolError, Result};
use super::map::Entry;
use super::records::Record;

/// One volume (or snapshot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    /// Stable id (never reused while the store is loaded).
    pub id: u32,
    /// Unique name in the store.
    pub name: String,
    /// Size in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// Clusters are allocated on first write.
    pub thin: bool,
    /// A snapshot: read-only.
    pub read_only: bool,
    /// The snapshot it was cloned from (or, for a volume that was snapshotted, its latest
    /// snapshot); 0: none.
    pub parent: u32,
    /// One entry per logical cluster.
    pub map: Vec<Entry>,
}

impl Volume {
    /// Clusters it maps (any layer).
    pub fn mapped(&self) -> usize {
        self.map.iter().filter(|e| e.is_mapped()).count()
    }
}

/// All volumes of a store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// Volumes by id.
    pub volumes: BTreeMap<u32, Volume>,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Data clusters of the store.
    pub clusters: u64,
    /// Granules per cluster.
    pub granules: u32,
    /// Map entries over all volumes (bounded: see [`Meta::max_entries`]).
    pub entries: u64,
}

/// Longest volume name.
pub const MAX_VOLUME_NAME: usize = 128;

/// Most logical clusters of one volume (its map lives in memory).
pub const MAX_VOLUME_CLUSTERS: u64 = 1 << 22;

/// Check a volume name: 1 to 128 characters of letters, digits, `-`, `_`, `.`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_VOLUME_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(LvolError::Invalid(format!(
            "bad volume name {name:?}: 1 to {MAX_VOLUME_NAME} of letters, digits, - _ ."
        )))
    }
}

impl Meta {
    /// Empty metadata for a geometry.
    pub fn new(cluster_size: u64, clusters: u64, granules: u32) -> Self {
        Self {
            volumes: BTreeMap::new(),
            cluster_size,
            clusters,
            granules,
            entries: 0,
        }
    }

    /// Most map entries a store holds over all its volumes and snapshots (maps live in
    /// memory: 256 per data cluster, at least 16 M). Metadata asking for more is refused.
    pub fn max_entries(&self) -> u64 {
        (self.clusters * 256).max(1 << 24)
    }

    /// Count `n` more map entries, or refuse them.
    pub fn reserve(&mut self, n: u64) -> Result<()> {
        if self.entries + n > self.max_entries() {
            return Err(LvolError::corrupt(format!(
                "{} map entries, more than the {} a store of {} clusters holds",
                self.entries + n,
                self.max_entries(),
                self.clusters
            )));
        }
        self.entries += n;
        Ok(())
    }

    /// Logical clusters of a volume of `size` bytes.
    pub fn clusters_for(&self, size: u64) -> usize {
        size.div_ceil(self.cluster_size) as usize
    }

    /// The volume named `name`.
    pub fn by_name(&self, name: &str) -> Option<&Volume> {
        self.volumes.values().find(|v| v.name == name)
    }

    fn vol(&mut self, id: u32) -> Result<&mut Volume> {
        self.volumes
            .get_mut(&id)
            .ok_or_else(|| LvolError::corrupt(format!("a record names volume {id}, unknown")))
    }

    fn fresh(&self, id: u32, name: &str) -> Result<()> {
        if self.volumes.contains_key(&id) || self.by_name(name).is_some() {
            return Err(LvolError::corrupt(format!(
                "a record creates volume {id} {name:?} twice"
            )));
        }
        check_name(name).map_err(|e| LvolError::corrupt(e.to_string()))
    }

    fn check_size(&self, size: u64) -> Result<()> {
        // the map lives in memory: a size no volume could have been made with is corruption
        // (or a hostile disk), not an allocation to attempt
        if size == 0
            || !size.is_multiple_of(4096)
            || size.div_ceil(self.cluster_size) > MAX_VOLUME_CLUSTERS
        {
            return Err(LvolError::corrupt(format!("a volume size of {size}")));
        }
        Ok(())
    }

    /// Apply one record. Records from disk are checked here: one that names an unknown
    /// volume or a cluster beyond the store is corruption.
    pub fn apply(&mut self, rec: &Record) -> Result<()> {
        match rec {
            Record::Create {
                id,
                name,
                size,
                thin,
            } => {
                self.fresh(*id, name)?;
                self.check_size(*size)?;
                let n = self.clusters_for(*size);
                self.reserve(n as u64)?;
                self.volumes.insert(
                    *id,
                    Volume {
                        id: *id,
                        name: name.clone(),
                        size: *size,
                        thin: *thin,
                        read_only: false,
                        parent: 0,
                        map: vec![Entry::Unmapped; n],
                    },
                );
            }
            Record::Delete { id } => {
                let gone = self
                    .volumes
                    .remove(id)
                    .ok_or_else(|| LvolError::corrupt(format!("delete of unknown volume {id}")))?;
                self.entries = self.entries.saturating_sub(gone.map.len() as u64);
                for v in self.volumes.values_mut() {
                    if v.parent == *id {
                        v.parent = gone.parent;
                    }
                }
            }
            Record::Resize { id, size } => {
                self.check_size(*size)?;
                let n = self.clusters_for(*size);
                let old = self.vol(*id)?.map.len();
                if n > old {
                    self.reserve((n - old) as u64)?;
                } else {
                    self.entries = self.entries.saturating_sub((old - n) as u64);
                }
                let v = self.vol(*id)?;
                v.size = *size;
                v.map.resize(n, Entry::Unmapped);
            }
            Record::Rename { id, name } => {
                if self.by_name(name).is_some() {
                    return Err(LvolError::corrupt(format!("rename to taken name {name}")));
                }
                check_name(name).map_err(|e| LvolError::corrupt(e.to_string()))?;
                self.vol(*id)?.name.clone_from(name);
            }
            Record::Snapshot { src, id, name } => {
                self.fresh(*id, name)?;
                let n = self.vol(*src)?.map.len();
                self.reserve(n as u64)?;
                let s = self.vol(*src)?;
                let snap = Volume {
                    id: *id,
                    name: name.clone(),
                    size: s.size,
                    thin: true,
                    read_only: true,
                    parent: s.parent,
                    map: s.map.clone(),
                };
                s.parent = *id;
                self.volumes.insert(*id, snap);
            }
            Record::Clone { snap, id, name } => {
                self.fresh(*id, name)?;
                let n = self.vol(*snap)?.map.len();
                self.reserve(n as u64)?;
                let s = self.vol(*snap)?;
                let clone = Volume {
                    id: *id,
                    name: name.clone(),
                    size: s.size,
                    thin: true,
                    read_only: false,
                    parent: *snap,
                    map: s.map.clone(),
                };
                self.volumes.insert(*id, clone);
            }
            Record::SetEntry {
                id,
                lcluster,
                entry,
            } => {
                let v = self.vol(*id)?;
                let slot = v.map.get_mut(*lcluster as usize).ok_or_else(|| {
                    LvolError::corrupt(format!("entry {lcluster} beyond volume {id}"))
                })?;
                *slot = entry.clone();
            }
            Record::MapRun {
                id,
                lcluster,
                pcluster,
                count,
            } => {
                let clusters = self.clusters;
                if u64::from(*pcluster) + u64::from(*count) > clusters {
                    return Err(LvolError::corrupt("a run beyond the store's clusters"));
                }
                let v = self.vol(*id)?;
                let (l, n) = (*lcluster as usize, *count as usize);
                let slots = v
                    .map
                    .get_mut(l..l.saturating_add(n))
                    .ok_or_else(|| LvolError::corrupt(format!("a run beyond volume {id}")))?;
                for (i, e) in slots.iter_mut().enumerate() {
                    *e = Entry::Full(pcluster + i as u32);
                }
            }
            Record::Decouple { id, thick } => {
                let v = self.vol(*id)?;
                v.parent = 0;
                if *thick {
                    v.thin = false;
                }
            }
        }
        Ok(())
    }

    /// References to every physical cluster (any layer of any volume).
    pub fn refcounts(&self) -> Vec<u32> {
        let mut refs = vec![0u32; self.clusters as usize];
        for v in self.volumes.values() {
            for e in &v.map {
                for c in e.clusters() {
                    if let Some(r) = refs.get_mut(c as usize) {
                        *r = r.saturating_add(1);
                    }
                }
            }
        }
        refs
    }

    /// The next unused volume id.
    pub fn next_id(&self) -> u32 {
        self.volumes.keys().next_back().map_or(1, |k| k + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_asking_for_absurd_maps_are_refused_not_allocated() {
        let mut m = Meta::new(64 << 10, 100, 16);
        let big = super::MAX_VOLUME_CLUSTERS * (64 << 10);
        let create = |id: u32, size: u64| Record::Create {
            id,
            name: format!("v{id}"),
            size,
            thin: true,
        };
        assert!(
            m.apply(&create(1, big + 4096)).is_err(),
            "one volume too big"
        );
        for id in 1..=4 {
            m.apply(&create(id, big)).unwrap();
        }
        let e = m.apply(&create(5, big)).unwrap_err().to_string();
        assert!(e.contains("map entries"), "{e}");
        let e = m
            .apply(&Record::Snapshot {
                src: 1,
                id: 9,
                name: "s".into(),
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("map entries"), "{e}");
        m.apply(&Record::Delete { id: 4 }).unwrap();
        m.apply(&Record::Snapshot {
            src: 1,
            id: 9,
            name: "s".into(),
        })
        .unwrap();
        assert_eq!(m.entries, 4 * super::MAX_VOLUME_CLUSTERS);
    }
}
