//! The checkpoint: every volume and its map in one image, written to the inactive of two
//! slots when the journal is full (and at load), then made current by a superblock
//! update. Full mappings to consecutive clusters are stored as runs, so a thick volume
//! costs a few bytes. Its length and CRC32C live in the superblock.

use super::codec::{Reader, Writer};
use super::error::{LvolError, Result};
use super::map::Entry;
use super::meta::{Meta, Volume};

const MAGIC: u32 = 0x4b43_564c; // "LVCK"

/// Encode `meta`.
pub fn encode(meta: &Meta) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(MAGIC);
    w.u32(meta.volumes.len() as u32);
    for v in meta.volumes.values() {
        w.u32(v.id);
        w.str(&v.name);
        w.u64(v.size);
        w.u8(u8::from(v.thin) | u8::from(v.read_only) << 1);
        w.u32(v.parent);
        // items: runs of full entries to consecutive clusters, single other entries
        let mut items = Writer::default();
        let mut count = 0u32;
        let mut l = 0usize;
        while l < v.map.len() {
            match &v.map[l] {
                Entry::Unmapped => l += 1,
                Entry::Full(p) => {
                    let mut n = 1usize;
                    while l + n < v.map.len() && v.map[l + n] == Entry::Full(p + n as u32) {
                        n += 1;
                    }
                    items.u8(1);
                    items.u32(l as u32);
                    items.u32(*p);
                    items.u32(n as u32);
                    count += 1;
                    l += n;
                }
                e @ Entry::Layered(_) => {
                    items.u8(2);
                    items.u32(l as u32);
                    e.encode(&mut items);
                    count += 1;
                    l += 1;
                }
            }
        }
        w.u32(count);
        w.0.extend_from_slice(&items.0);
    }
    w.0
}

/// Decode a checkpoint into metadata of the given geometry.
pub fn decode(buf: &[u8], cluster_size: u64, clusters: u64, granules: u32) -> Result<Meta> {
    let mut r = Reader::new(buf);
    if r.u32()? != MAGIC {
        return Err(LvolError::corrupt("checkpoint magic"));
    }
    let mut meta = Meta::new(cluster_size, clusters, granules);
    let n = r.u32()?;
    for _ in 0..n {
        let id = r.u32()?;
        let name = r.str()?;
        let size = r.u64()?;
        let flags = r.u8()?;
        let parent = r.u32()?;
        if size == 0 || size.div_ceil(cluster_size) > super::meta::MAX_VOLUME_CLUSTERS {
            return Err(LvolError::corrupt(format!(
                "volume {name:?} of size {size}"
            )));
        }
        meta.reserve(meta.clusters_for(size) as u64)?;
        let mut map = vec![Entry::Unmapped; meta.clusters_for(size)];
        let items = r.u32()?;
        for _ in 0..items {
            match r.u8()? {
                1 => {
                    let (l, p, k) = (r.u32()? as usize, r.u32()?, r.u32()?);
                    if u64::from(p) + u64::from(k) > clusters || l + k as usize > map.len() {
                        return Err(LvolError::corrupt(format!("a run out of range in {name}")));
                    }
                    for i in 0..k as usize {
                        map[l + i] = Entry::Full(p + i as u32);
                    }
                }
                2 => {
                    let l = r.u32()? as usize;
                    let e = Entry::decode(&mut r, clusters, granules)?;
                    *map.get_mut(l).ok_or_else(|| {
                        LvolError::corrupt(format!("an entry out of range in {name}"))
                    })? = e;
                }
                t => return Err(LvolError::corrupt(format!("checkpoint item tag {t}"))),
            }
        }
        if meta.volumes.contains_key(&id) || meta.by_name(&name).is_some() {
            return Err(LvolError::corrupt(format!("volume {id} {name:?} twice")));
        }
        meta.volumes.insert(
            id,
            Volume {
                id,
                name,
                size,
                thin: flags & 1 != 0,
                read_only: flags & 2 != 0,
                parent,
                map,
            },
        );
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lvol::map::{Layer, bits_empty, set_bits};

    #[test]
    fn a_checkpoint_round_trips_runs_and_layers() {
        let mut m = Meta::new(64 << 10, 100, 16);
        let mut bits = bits_empty(16);
        set_bits(&mut bits, 1, 3);
        let mut map = vec![Entry::Unmapped; 8];
        for (i, e) in map.iter_mut().enumerate().take(5) {
            *e = Entry::Full(10 + i as u32);
        }
        map[6] = Entry::Layered(
            vec![Layer {
                cluster: 50,
                valid: bits,
            }]
            .into(),
        );
        m.entries = 8;
        m.volumes.insert(
            3,
            Volume {
                id: 3,
                name: "a".into(),
                size: 8 << 16,
                thin: true,
                read_only: false,
                parent: 0,
                map,
            },
        );
        let b = encode(&m);
        assert_eq!(decode(&b, 64 << 10, 100, 16).unwrap(), m);
        for cut in [0, 5, b.len() - 1] {
            assert!(decode(&b[..cut], 64 << 10, 100, 16).is_err());
        }
        assert!(
            decode(&b, 64 << 10, 20, 16).is_err(),
            "clusters beyond the store"
        );
    }
}
