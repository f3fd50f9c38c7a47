//! The superblock: two copies (at 0 and 4 KiB), each a whole 4 KiB block guarded by a
//! CRC32C, with a generation counter. A store is loaded from the valid copy of the highest
//! generation, so a write torn in either copy leaves the other.
//!
//! Layout (little endian): magic 8 | version 4 | crc32c 4 | incompat 8 | compat 8 |
//! generation 8 | uuid 16 | name (u16 length + bytes, at most 64) | cluster size 8 |
//! granule 8 | base size 8 | journal offset 8 | journal length 8 | checkpoint offsets 2x8 |
//! checkpoint slot length 8 | active slot 1 | checkpoint bytes 8 | checkpoint crc 4 |
//! journal start sequence 8 | data offset 8 | clusters 8.

use super::codec::{Reader, Writer};
use super::error::{LvolError, Result};

/// Bytes of one superblock copy.
pub const SB_SIZE: usize = 4096;
/// Offsets of the two copies.
pub const SB_OFFSETS: [u64; 2] = [0, SB_SIZE as u64];
/// Longest store name.
pub const MAX_NAME: usize = 64;
const MAGIC: [u8; 8] = *b"VNVMLVS1";
const VERSION: u32 = 1;
/// Format features this build understands that an older one must refuse (none yet: the
/// first format). A store with an unknown bit set here is not loaded.
pub const INCOMPAT_KNOWN: u64 = 0;

/// Where everything lives on the base backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Cluster size in bytes (a power of two, >= 64 KiB... or 16 KiB in tests).
    pub cluster_size: u64,
    /// Sub-cluster granule in bytes (4 KiB): copy-on-write and first writes are tracked
    /// per granule.
    pub granule: u64,
    /// Size of the base backend when the store was made.
    pub base_size: u64,
    /// Journal area.
    pub journal_off: u64,
    /// Journal length in bytes.
    pub journal_len: u64,
    /// The two checkpoint slots.
    pub ckpt_off: [u64; 2],
    /// Bytes per checkpoint slot.
    pub ckpt_len: u64,
    /// First data cluster's byte offset.
    pub data_off: u64,
    /// Data clusters.
    pub clusters: u64,
}

impl Geometry {
    /// The layout for a base of `base_size` bytes with clusters of `cluster_size` bytes;
    /// `journal_len` overrides the journal's default length.
    pub fn plan(base_size: u64, cluster_size: u64, journal_len: Option<u64>) -> Result<Self> {
        const GRANULE: u64 = 4096;
        if !cluster_size.is_power_of_two() || !(16 << 10..=64 << 20).contains(&cluster_size) {
            return Err(LvolError::Invalid(format!(
                "cluster size {cluster_size} is not a power of two from 16 KiB to 64 MiB"
            )));
        }
        let round = |v: u64, to: u64| v.div_ceil(to) * to;
        let est = base_size / cluster_size;
        let journal_len = round(
            journal_len.unwrap_or_else(|| (est * 16).clamp(1 << 20, 64 << 20)),
            GRANULE,
        )
        .max(GRANULE * 4);
        // a checkpoint holds every volume's map; mapped clusters cost about 24 bytes
        // (runs of contiguous clusters far less), plus room for volume names
        let ckpt_len = round(
            est * 24 + (base_size / 256).clamp(64 << 10, 4 << 20),
            GRANULE,
        );
        let journal_off = 2 * SB_SIZE as u64;
        let ckpt0 = journal_off + journal_len;
        let ckpt1 = ckpt0 + ckpt_len;
        let data_off = round(ckpt1 + ckpt_len, cluster_size);
        if base_size < data_off + cluster_size {
            return Err(LvolError::TooSmall(format!(
                "{base_size} bytes, metadata alone needs {data_off} (cluster {cluster_size})"
            )));
        }
        let clusters = ((base_size - data_off) / cluster_size).min(u64::from(u32::MAX - 1));
        Ok(Self {
            cluster_size,
            granule: GRANULE,
            base_size,
            journal_off,
            journal_len,
            ckpt_off: [ckpt0, ckpt1],
            ckpt_len,
            data_off,
            clusters,
        })
    }

    /// Granules per cluster.
    pub fn granules(&self) -> u32 {
        (self.cluster_size / self.granule) as u32
    }

    /// Byte offset of cluster `c` on the base.
    pub fn cluster_at(&self, c: u32) -> u64 {
        self.data_off + u64::from(c) * self.cluster_size
    }
}

/// One superblock copy's contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Incompatible features in use.
    pub incompat: u64,
    /// Compatible features in use.
    pub compat: u64,
    /// Bumped at every superblock write; the highest valid copy wins.
    pub generation: u64,
    /// The store's identity.
    pub uuid: [u8; 16],
    /// The store's name.
    pub name: String,
    /// Layout.
    pub geometry: Geometry,
    /// Checkpoint slot in use (0 or 1).
    pub active: u8,
    /// Bytes of the checkpoint in the active slot.
    pub ckpt_bytes: u64,
    /// CRC32C of those bytes.
    pub ckpt_crc: u32,
    /// Sequence number of the first journal record after that checkpoint.
    pub journal_seq: u64,
}

impl Superblock {
    /// The block to write (crc filled).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.0.extend_from_slice(&MAGIC);
        w.u32(VERSION);
        w.u32(0); // crc, filled below
        w.u64(self.incompat);
        w.u64(self.compat);
        w.u64(self.generation);
        w.0.extend_from_slice(&self.uuid);
        w.str(&self.name);
        let g = &self.geometry;
        for v in [
            g.cluster_size,
            g.granule,
            g.base_size,
            g.journal_off,
            g.journal_len,
            g.ckpt_off[0],
            g.ckpt_off[1],
            g.ckpt_len,
        ] {
            w.u64(v);
        }
        w.u8(self.active);
        w.u64(self.ckpt_bytes);
        w.u32(self.ckpt_crc);
        w.u64(self.journal_seq);
        w.u64(g.data_off);
        w.u64(g.clusters);
        let mut b = w.0;
        b.resize(SB_SIZE, 0);
        let crc = crc32c::crc32c(&b);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parse one copy; a wrong magic is [`LvolError::NoStore`], anything else bad is
    /// [`LvolError::Corrupt`].
    pub fn decode(block: &[u8]) -> Result<Self> {
        if block.len() < SB_SIZE || block[..8] != MAGIC {
            return Err(LvolError::NoStore("no superblock magic".into()));
        }
        let mut copy = block[..SB_SIZE].to_vec();
        let stored = u32::from_le_bytes([copy[12], copy[13], copy[14], copy[15]]);
        copy[12..16].fill(0);
        if crc32c::crc32c(&copy) != stored {
            return Err(LvolError::corrupt("superblock CRC mismatch"));
        }
        let mut r = Reader::new(&block[8..SB_SIZE]);
        let version = r.u32()?;
        if version != VERSION {
            return Err(LvolError::corrupt(format!("superblock version {version}")));
        }
        r.u32()?;
        let incompat = r.u64()?;
        if incompat & !INCOMPAT_KNOWN != 0 {
            return Err(LvolError::Unsupported(incompat & !INCOMPAT_KNOWN));
        }
        let compat = r.u64()?;
        let generation = r.u64()?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(r.bytes(16)?);
        let name = r.str()?;
        let mut g = [0u64; 8];
        for v in &mut g {
            *v = r.u64()?;
        }
        let active = r.u8()?;
        let ckpt_bytes = r.u64()?;
        let ckpt_crc = r.u32()?;
        let journal_seq = r.u64()?;
        let data_off = r.u64()?;
        let clusters = r.u64()?;
        let geometry = Geometry {
            cluster_size: g[0],
            granule: g[1],
            base_size: g[2],
            journal_off: g[3],
            journal_len: g[4],
            ckpt_off: [g[5], g[6]],
            ckpt_len: g[7],
            data_off,
            clusters,
        };
        // the geometry must be one `plan` could have made: nothing overlaps, sizes sane
        let sane = geometry.granule == 4096
            && geometry.cluster_size.is_power_of_two()
            && geometry.cluster_size >= geometry.granule
            && geometry.cluster_size <= 64 << 20
            && geometry.journal_off >= 2 * SB_SIZE as u64
            && geometry.journal_len.is_multiple_of(4096)
            && geometry.journal_len >= 4096
            && geometry.ckpt_off[0] >= geometry.journal_off + geometry.journal_len
            && geometry.ckpt_off[1] >= geometry.ckpt_off[0] + geometry.ckpt_len
            && geometry.data_off >= geometry.ckpt_off[1] + geometry.ckpt_len
            && geometry.clusters >= 1
            && geometry.clusters < u64::from(u32::MAX)
            && geometry
                .clusters
                .checked_mul(geometry.cluster_size)
                .and_then(|d| d.checked_add(geometry.data_off))
                .is_some_and(|end| end <= geometry.base_size)
            && active <= 1
            && ckpt_bytes <= geometry.ckpt_len
            && name.len() <= MAX_NAME;
        if !sane {
            return Err(LvolError::corrupt("superblock geometry is inconsistent"));
        }
        Ok(Self {
            incompat,
            compat,
            generation,
            uuid,
            name,
            geometry,
            active,
            ckpt_bytes,
            ckpt_crc,
            journal_seq,
        })
    }

    /// The copy to use of two read blocks: the valid one of the highest generation. Errors
    /// name both copies' problems.
    pub fn pick(a: &[u8], b: &[u8]) -> Result<(Self, [Option<String>; 2])> {
        let ra = Self::decode(a);
        let rb = Self::decode(b);
        let why = |r: &Result<Self>| r.as_ref().err().map(ToString::to_string);
        let problems = [why(&ra), why(&rb)];
        match (ra, rb) {
            (Ok(x), Ok(y)) => Ok((if y.generation > x.generation { y } else { x }, problems)),
            (Ok(x), Err(_)) | (Err(_), Ok(x)) => Ok((x, problems)),
            (Err(LvolError::NoStore(_)), Err(LvolError::NoStore(_))) => Err(LvolError::NoStore(
                "neither superblock copy has the magic".into(),
            )),
            (Err(e @ LvolError::Unsupported(_)), _) | (_, Err(e @ LvolError::Unsupported(_))) => {
                Err(e)
            }
            (Err(e1), Err(e2)) => Err(LvolError::corrupt(format!(
                "both superblock copies are bad: {e1}; {e2}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_round_trips_and_the_newest_valid_copy_wins() {
        let g = Geometry::plan(256 << 20, 1 << 20, None).unwrap();
        let mut sb = Superblock {
            incompat: 0,
            compat: 0,
            generation: 7,
            uuid: [3; 16],
            name: "pool".into(),
            geometry: g,
            active: 1,
            ckpt_bytes: 100,
            ckpt_crc: 5,
            journal_seq: 9,
        };
        let a = sb.encode();
        assert_eq!(Superblock::decode(&a).unwrap(), sb);
        sb.generation = 8;
        let mut b = sb.encode();
        assert_eq!(Superblock::pick(&a, &b).unwrap().0.generation, 8);
        b[700] ^= 1; // torn newer copy: the older one is used
        assert_eq!(Superblock::pick(&a, &b).unwrap().0.generation, 7);
        let mut bad = a.clone();
        bad[300] ^= 1;
        assert!(matches!(
            Superblock::pick(&bad, &b),
            Err(LvolError::Corrupt(_))
        ));
        assert!(matches!(
            Superblock::pick(&[0; 4096], &[0; 4096]),
            Err(LvolError::NoStore(_))
        ));
        // an unknown incompatible feature is refused by name
        sb.incompat = 1 << 9;
        assert!(matches!(
            Superblock::decode(&sb.encode()),
            Err(LvolError::Unsupported(_))
        ));
    }
}
