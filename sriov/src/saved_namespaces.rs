//! A subsystem's namespaces as a supervised worker saves them in its keeper controller's
//! journal (`device_model::journal`, the subsystem blob): which namespaces exist, their
//! format and identity, and the controllers each is attached to. What the guest changed with
//! Namespace Management (NVMe base 2.0 §5.20) and Namespace Attachment (§5.19) lives only
//! there; the next worker puts it back ([`crate::Subsystem::settle`]).
//!
//! The bytes come from a file another process wrote: every count is bounded and every read
//! checked; a blob that does not decode is refused whole.

use device_model::CommandTag;

/// Format version; a blob of another is not read.
const VERSION: u16 = 1;
/// Controllers one namespace may list (CNTLIDs are u16; a subsystem has far fewer).
const MAX_ATTACHED: usize = 1024;

/// One namespace as saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedNamespace {
    pub nsid: u32,
    pub lba_shift: u8,
    pub shared: bool,
    pub size: u64,
    /// Bytes taken from the pool (0: configured or added by the management plane).
    pub pooled: u64,
    /// Its number among the namespaces the subsystem created (its identity seed), 0 if none.
    pub created: u64,
    /// A hash of its identity seed: what tells two namespaces with the same NSID apart
    /// (another volume added later under a freed NSID).
    pub ident: u64,
    /// CNTLIDs, ascending.
    pub attached: Vec<u16>,
}

/// A subsystem's namespaces as saved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedNamespaces {
    /// Namespaces created so far (the next one's identity seed follows).
    pub generation: u64,
    /// The admin command that made the last change, with its dword 0
    /// (`NvmSubsystem::applied`).
    pub last: Option<(CommandTag, u32)>,
    /// The NSID the most recent change was about (`u32::MAX`: all, 0: none): the next
    /// worker tells the hosts about it again, as that change may have been saved and not
    /// yet told when the worker died.
    pub recent: u32,
    pub namespaces: Vec<SavedNamespace>,
}

impl SavedNamespaces {
    /// The blob.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(16 + self.namespaces.len() * 48);
        w.extend_from_slice(&VERSION.to_le_bytes());
        w.extend_from_slice(&self.generation.to_le_bytes());
        match self.last {
            None => w.push(0),
            Some((t, dw0)) => {
                w.push(1);
                w.extend_from_slice(&t.seq.to_le_bytes());
                w.extend_from_slice(&t.sq_pos.to_le_bytes());
                w.extend_from_slice(&t.cid.to_le_bytes());
                w.push(t.opcode);
                w.extend_from_slice(&dw0.to_le_bytes());
            }
        }
        w.extend_from_slice(&self.recent.to_le_bytes());
        w.extend_from_slice(&(self.namespaces.len() as u32).to_le_bytes());
        for n in &self.namespaces {
            w.extend_from_slice(&n.nsid.to_le_bytes());
            w.push(n.lba_shift);
            w.push(u8::from(n.shared));
            for v in [n.size, n.pooled, n.created, n.ident] {
                w.extend_from_slice(&v.to_le_bytes());
            }
            let att = &n.attached[..n.attached.len().min(MAX_ATTACHED)];
            w.extend_from_slice(&(att.len() as u16).to_le_bytes());
            for c in att {
                w.extend_from_slice(&c.to_le_bytes());
            }
        }
        w
    }

    /// Decode untrusted bytes; `None` when they are not a whole blob of this version with
    /// at most `max_namespaces` namespaces.
    pub fn decode(b: &[u8], max_namespaces: usize) -> Option<Self> {
        let mut r = Reader(b);
        if r.u16()? != VERSION {
            return None;
        }
        let generation = r.u64()?;
        let last = match r.u8()? {
            0 => None,
            1 => {
                let tag = CommandTag {
                    seq: r.u32()?,
                    sq_pos: r.u32()?,
                    cid: r.u16()?,
                    opcode: r.u8()?,
                };
                Some((tag, r.u32()?))
            }
            _ => return None,
        };
        let recent = r.u32()?;
        let n = r.u32()? as usize;
        if n > max_namespaces {
            return None;
        }
        let mut namespaces = Vec::with_capacity(n);
        for _ in 0..n {
            let nsid = r.u32()?;
            let lba_shift = r.u8()?;
            let shared = r.u8()? != 0;
            let (size, pooled, created, ident) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
            if namespaces.iter().any(|s: &SavedNamespace| s.nsid == nsid) {
                return None;
            }
            let k = r.u16()? as usize;
            if k > MAX_ATTACHED {
                return None;
            }
            let mut attached = Vec::with_capacity(k);
            for _ in 0..k {
                attached.push(r.u16()?);
            }
            namespaces.push(SavedNamespace {
                nsid,
                lba_shift,
                shared,
                size,
                pooled,
                created,
                ident,
                attached,
            });
        }
        r.0.is_empty().then_some(Self {
            generation,
            last,
            recent,
            namespaces,
        })
    }
}

/// Bounds-checked little-endian reads.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (a, b) = self.0.split_first_chunk::<N>()?;
        self.0 = b;
        Some(*a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SavedNamespaces {
        SavedNamespaces {
            generation: 7,
            last: Some((
                CommandTag {
                    seq: 9,
                    sq_pos: 3,
                    cid: 0x1234,
                    opcode: 0x15,
                },
                4,
            )),
            recent: 4,
            namespaces: vec![
                SavedNamespace {
                    nsid: 1,
                    lba_shift: 9,
                    shared: true,
                    size: 1 << 20,
                    pooled: 0,
                    created: 0,
                    ident: 11,
                    attached: vec![1, 0x1001],
                },
                SavedNamespace {
                    nsid: 4,
                    lba_shift: 12,
                    shared: false,
                    size: 8 << 20,
                    pooled: 8 << 20,
                    created: 7,
                    ident: 12,
                    attached: vec![],
                },
            ],
        }
    }

    #[test]
    fn round_trip_and_garbage_is_refused_whole() {
        let s = sample();
        let b = s.encode();
        assert_eq!(SavedNamespaces::decode(&b, 256), Some(s));
        assert_eq!(SavedNamespaces::decode(&b, 1), None, "too many namespaces");
        for cut in 0..b.len() {
            assert_eq!(
                SavedNamespaces::decode(&b[..cut], 256),
                None,
                "cut at {cut}"
            );
        }
        let mut longer = b.clone();
        longer.push(0);
        assert_eq!(
            SavedNamespaces::decode(&longer, 256),
            None,
            "trailing bytes"
        );
        let mut other = b;
        other[0] = 9;
        assert_eq!(
            SavedNamespaces::decode(&other, 256),
            None,
            "another version"
        );
        assert_eq!(SavedNamespaces::decode(&[0xff; 64], 256), None);
        let mut twice = sample();
        twice.namespaces[1].nsid = 1;
        assert_eq!(
            SavedNamespaces::decode(&twice.encode(), 256),
            None,
            "an NSID twice"
        );
    }
}
