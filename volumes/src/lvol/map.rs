//! A volume's cluster map entry. A logical cluster is unmapped (reads zeroes), mapped to
//! one physical cluster in full, or layered: a stack of physical clusters, top first, each
//! with a bitmap of the 4 KiB granules it holds. A granule reads from the first layer that
//! holds it, zeroes when none does. That is how a 4 KiB write to a shared cluster stays
//! cheap (a new top layer holding one granule over the shared one) and how a first write
//! to a thin cluster needs no zeroing of the rest.

use super::codec::{Reader, Writer};
use super::error::{LvolError, Result};

/// Layers an entry may stack before a write collapses it into one full cluster (the write
/// puts one more layer on top and fills it from the others: `fill.rs`).
pub const MAX_LAYERS: usize = 4;

/// Granule bitmap, one bit per granule of a cluster.
pub type Bits = Box<[u64]>;

/// An empty bitmap for `granules` granules.
pub fn bits_empty(granules: u32) -> Bits {
    vec![0u64; granules.div_ceil(64) as usize].into_boxed_slice()
}

/// Is granule `g` set?
pub fn bit(b: &[u64], g: u32) -> bool {
    b.get((g / 64) as usize)
        .is_some_and(|w| w >> (g % 64) & 1 == 1)
}

/// Set granules `[g0, g1)`; true when any changed.
pub fn set_bits(b: &mut [u64], g0: u32, g1: u32) -> bool {
    let mut changed = false;
    for g in g0..g1 {
        if let Some(w) = b.get_mut((g / 64) as usize) {
            let m = 1u64 << (g % 64);
            changed |= *w & m == 0;
            *w |= m;
        }
    }
    changed
}

/// Are all `granules` set?
pub fn all_set(b: &[u64], granules: u32) -> bool {
    (0..granules).all(|g| bit(b, g))
}

/// One layer of a layered entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// Physical cluster.
    pub cluster: u32,
    /// Granules it holds.
    pub valid: Bits,
}

/// A logical cluster's mapping.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Entry {
    /// Reads zeroes; owns nothing.
    #[default]
    Unmapped,
    /// The whole cluster lives in this physical cluster.
    Full(u32),
    /// A stack of partial clusters, top first.
    Layered(Box<[Layer]>),
}

impl Entry {
    /// Physical clusters it references.
    pub fn clusters(&self) -> impl Iterator<Item = u32> + '_ {
        let (one, many): (Option<u32>, &[Layer]) = match self {
            Entry::Unmapped => (None, &[]),
            Entry::Full(c) => (Some(*c), &[]),
            Entry::Layered(l) => (None, l),
        };
        one.into_iter().chain(many.iter().map(|l| l.cluster))
    }

    /// The cluster serving granule `g` (None: zeroes).
    pub fn source(&self, g: u32) -> Option<u32> {
        match self {
            Entry::Unmapped => None,
            Entry::Full(c) => Some(*c),
            Entry::Layered(ls) => ls.iter().find(|l| bit(&l.valid, g)).map(|l| l.cluster),
        }
    }

    /// The cluster writes go to (the top), if mapped.
    pub fn top(&self) -> Option<u32> {
        match self {
            Entry::Unmapped => None,
            Entry::Full(c) => Some(*c),
            Entry::Layered(ls) => ls.first().map(|l| l.cluster),
        }
    }

    /// Is the entry mapped at all?
    pub fn is_mapped(&self) -> bool {
        !matches!(self, Entry::Unmapped)
    }

    /// Encode (tag, then the payload).
    pub fn encode(&self, w: &mut Writer) {
        match self {
            Entry::Unmapped => w.u8(0),
            Entry::Full(c) => {
                w.u8(1);
                w.u32(*c);
            }
            Entry::Layered(ls) => {
                w.u8(2);
                w.u8(ls.len() as u8);
                for l in ls {
                    w.u32(l.cluster);
                    w.u16(l.valid.len() as u16);
                    for x in &l.valid {
                        w.u64(*x);
                    }
                }
            }
        }
    }

    /// Decode, checking clusters against `clusters` and bitmaps against `granules`.
    pub fn decode(r: &mut Reader<'_>, clusters: u64, granules: u32) -> Result<Self> {
        let check = |c: u32| {
            if u64::from(c) < clusters {
                Ok(c)
            } else {
                Err(LvolError::corrupt(format!(
                    "cluster {c} beyond the store's {clusters}"
                )))
            }
        };
        Ok(match r.u8()? {
            0 => Entry::Unmapped,
            1 => Entry::Full(check(r.u32()?)?),
            2 => {
                let n = r.u8()? as usize;
                if n == 0 || n > MAX_LAYERS + 1 {
                    return Err(LvolError::corrupt(format!("an entry of {n} layers")));
                }
                let mut ls = Vec::with_capacity(n);
                for _ in 0..n {
                    let cluster = check(r.u32()?)?;
                    let words = r.u16()? as usize;
                    if words != granules.div_ceil(64) as usize {
                        return Err(LvolError::corrupt("a granule bitmap of the wrong size"));
                    }
                    let mut valid = bits_empty(granules);
                    for x in &mut valid {
                        *x = r.u64()?;
                    }
                    ls.push(Layer { cluster, valid });
                }
                Entry::Layered(ls.into_boxed_slice())
            }
            t => return Err(LvolError::corrupt(format!("map entry tag {t}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granules_read_from_the_top_layer_holding_them() {
        let mut top = bits_empty(16);
        set_bits(&mut top, 2, 4);
        let mut low = bits_empty(16);
        set_bits(&mut low, 0, 16);
        let e = Entry::Layered(
            vec![
                Layer {
                    cluster: 9,
                    valid: top,
                },
                Layer {
                    cluster: 4,
                    valid: low,
                },
            ]
            .into(),
        );
        assert_eq!(e.source(2), Some(9));
        assert_eq!(e.source(5), Some(4));
        assert_eq!(e.top(), Some(9));
        assert_eq!(e.clusters().collect::<Vec<_>>(), [9, 4]);
        let mut w = Writer::default();
        e.encode(&mut w);
        assert_eq!(Entry::decode(&mut Reader::new(&w.0), 10, 16).unwrap(), e);
        assert!(Entry::decode(&mut Reader::new(&w.0), 5, 16).is_err());
        assert!(Entry::decode(&mut Reader::new(&w.0[..7]), 10, 16).is_err());
    }
}
