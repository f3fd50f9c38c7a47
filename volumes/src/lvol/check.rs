//! The offline check (`vnvme lvs-check`): loads a store without writing to it and
//! verifies what the format promises. CRCs of the superblock copies, the checkpoint and
//! every journal record are verified by the load itself (a bad copy, a corrupt record
//! in the committed sequence fail it); then every map is checked against the rules.
//!
//! - every physical cluster a map names is within the store;
//! - a physical cluster holds one logical cluster: all references to it (by any volume,
//!   any layer) are at the same logical index, and a volume names it at most once. Two
//!   owners of one cluster at different places is what a double allocation looks like;
//! - layered entries have their top layer holding something or are fresh, and at most
//!   the layers a write may stack;
//! - a thick volume maps every cluster; a volume's map length matches its size;
//! - parents name existing snapshots.
//!
//! Clusters neither referenced nor free cannot exist (the free map is derived); the
//! report counts free and referenced clusters and the sharing.

use device_model::backend::Backend;

use super::error::Result;
use super::map::{Entry, MAX_LAYERS};
use super::store::read_store;
use super::syncio::SyncIo;

/// The result of a check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Store name.
    pub name: String,
    /// Superblock generation in use.
    pub generation: u64,
    /// A superblock copy not used, and why (not an error: a torn write leaves one).
    pub bad_copies: Vec<String>,
    /// Journal records replayed.
    pub replayed: usize,
    /// Volumes and snapshots.
    pub volumes: usize,
    /// Data clusters.
    pub clusters: u64,
    /// Clusters referenced.
    pub referenced: u64,
    /// Clusters referenced more than once (shared by snapshots and clones).
    pub shared: u64,
    /// Free clusters.
    pub free: u64,
    /// Rule violations found.
    pub errors: Vec<String>,
}

impl CheckReport {
    /// No violations.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Check the store on `base` (read only). An `Err` is a store that does not load.
pub fn check(base: &mut dyn Backend) -> Result<CheckReport> {
    let mut sync = SyncIo::default();
    let (sb, meta, _, _, load) = read_store(base, &mut sync)?;
    let g = &sb.geometry;
    let mut rep = CheckReport {
        name: sb.name.clone(),
        generation: sb.generation,
        bad_copies: load.bad_copies,
        replayed: load.replayed,
        volumes: meta.volumes.len(),
        clusters: g.clusters,
        ..CheckReport::default()
    };
    const NONE: u32 = u32::MAX;
    let mut home = vec![NONE; g.clusters as usize];
    let mut refs = vec![0u32; g.clusters as usize];
    let granules = g.granules();
    for v in meta.volumes.values() {
        let want = v.size.div_ceil(g.cluster_size) as usize;
        if v.map.len() != want {
            rep.errors.push(format!(
                "{}: {} map entries for {} bytes",
                v.name,
                v.map.len(),
                v.size
            ));
        }
        if v.parent != 0 && !meta.volumes.get(&v.parent).is_some_and(|p| p.read_only) {
            rep.errors
                .push(format!("{}: parent {} is not a snapshot", v.name, v.parent));
        }
        let mut seen = std::collections::HashSet::new();
        for (l, e) in v.map.iter().enumerate() {
            if !v.thin && !e.is_mapped() {
                rep.errors.push(format!(
                    "{}: thick volume with cluster {l} unmapped",
                    v.name
                ));
            }
            if let Entry::Layered(ls) = e {
                // one more while its collapse runs (a crash may leave it so)
                if ls.len() > MAX_LAYERS + 1 {
                    rep.errors
                        .push(format!("{}: {} layers at {l}", v.name, ls.len()));
                }
                if ls
                    .iter()
                    .any(|x| x.valid.len() != granules.div_ceil(64) as usize)
                {
                    rep.errors.push(format!("{}: bitmap size at {l}", v.name));
                }
            }
            for c in e.clusters() {
                let Some(h) = home.get_mut(c as usize) else {
                    rep.errors
                        .push(format!("{}: cluster {c} at {l} beyond the store", v.name));
                    continue;
                };
                if !seen.insert(c) {
                    rep.errors.push(format!(
                        "{}: cluster {c} mapped twice in one volume",
                        v.name
                    ));
                }
                if *h == NONE {
                    *h = l as u32;
                } else if *h != l as u32 {
                    rep.errors.push(format!(
                        "cluster {c} is owned at logical {} and, by {}, at {l}: allocated twice",
                        *h, v.name
                    ));
                }
                refs[c as usize] += 1;
            }
        }
    }
    rep.referenced = refs.iter().filter(|&&r| r > 0).count() as u64;
    rep.shared = refs.iter().filter(|&&r| r > 1).count() as u64;
    rep.free = g.clusters - rep.referenced;
    Ok(rep)
}
