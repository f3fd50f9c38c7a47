//! Where an array's bytes live: the mapping of an array byte range onto member extents
//! (concat: one after the other; RAID 0 and RAID 10: strips round robin over the legs;
//! RAID 1: one leg). A *leg* is one member (concat, RAID 0) or a set of mirrors (RAID 1:
//! all members, RAID 10: a pair); offsets here are in the members' data area (after the
//! reserved superblock area).

use std::ops::Range;

/// An array's RAID level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    Concat,
    Raid0,
    Raid1,
    Raid10,
}

impl Level {
    /// The name users write (`raid0`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Level::Concat => "concat",
            Level::Raid0 => "raid0",
            Level::Raid1 => "raid1",
            Level::Raid10 => "raid10",
        }
    }
    /// The byte stored in a superblock.
    pub fn code(self) -> u8 {
        match self {
            Level::Concat => 0xc,
            Level::Raid0 => 0,
            Level::Raid1 => 1,
            Level::Raid10 => 10,
        }
    }
    /// The level of a superblock byte.
    pub fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0xc => Level::Concat,
            0 => Level::Raid0,
            1 => Level::Raid1,
            10 => Level::Raid10,
            _ => return None,
        })
    }
    /// True for the levels that keep copies (RAID 1, RAID 10).
    pub fn mirrored(self) -> bool {
        matches!(self, Level::Raid1 | Level::Raid10)
    }
    /// True for the levels striped in strips.
    pub fn striped(self) -> bool {
        matches!(self, Level::Raid0 | Level::Raid10)
    }
    /// Why `n` members do not make an array of this level, if they do not.
    pub fn check_members(self, n: usize) -> Result<(), String> {
        let ok = match self {
            Level::Concat | Level::Raid0 => (1..=MAX_MEMBERS).contains(&n),
            Level::Raid1 => (2..=4).contains(&n),
            Level::Raid10 => (4..=MAX_MEMBERS).contains(&n) && n.is_multiple_of(2),
        };
        if ok {
            return Ok(());
        }
        Err(match self {
            Level::Concat | Level::Raid0 => {
                format!("{} takes 1 to {MAX_MEMBERS} members, not {n}", self.name())
            }
            Level::Raid1 => format!("raid1 takes 2 to 4 members, not {n}"),
            Level::Raid10 => {
                format!("raid10 takes an even number of members, 4 to {MAX_MEMBERS}, not {n}")
            }
        })
    }
}

impl std::str::FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "concat" => Ok(Level::Concat),
            "raid0" | "0" => Ok(Level::Raid0),
            "raid1" | "1" => Ok(Level::Raid1),
            "raid10" | "10" => Ok(Level::Raid10),
            _ => Err(format!("'{s}': level is raid0, raid1, raid10 or concat")),
        }
    }
}

/// Most members of one array.
pub const MAX_MEMBERS: usize = 16;

/// One piece of a mapped range: `len` bytes at `member_off` of leg `leg`'s data area, which
/// are bytes `buf_off..buf_off + len` of the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub leg: usize,
    pub member_off: u64,
    pub buf_off: u64,
    pub len: u64,
}

/// The geometry of an array.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub level: Level,
    /// Strip size in bytes (RAID 0 and 10).
    pub strip: u64,
    pub members: usize,
    /// Data bytes of each leg (concat: each member's own; otherwise all equal).
    pub leg_sizes: Vec<u64>,
    /// log2 of the strip size and of the leg count, for striped levels where both are
    /// powers of two: the one-piece mapping of every I/O is then two shifts and two masks.
    shifts: Option<(u32, u32)>,
    /// The sum of `leg_sizes`.
    size: u64,
}

impl Layout {
    /// The layout of `level` over members with `data` data bytes each (the smallest is used
    /// for every level but concat; striped levels round down to whole strips).
    pub fn new(level: Level, strip: u64, data: &[u64]) -> Self {
        let min = data.iter().copied().min().unwrap_or(0);
        let legs = match level {
            Level::Concat => data.to_vec(),
            Level::Raid0 => vec![min - min % strip; data.len()],
            Level::Raid1 => vec![min],
            Level::Raid10 => vec![min - min % strip; data.len() / 2],
        };
        let shifts = (level.striped() && strip.is_power_of_two() && legs.len().is_power_of_two())
            .then(|| (strip.trailing_zeros(), legs.len().trailing_zeros()));
        Self {
            level,
            strip,
            members: data.len(),
            size: legs.iter().sum(),
            leg_sizes: legs,
            shifts,
        }
    }

    /// Number of legs.
    pub fn legs(&self) -> usize {
        self.leg_sizes.len()
    }

    /// Member slots of leg `leg`.
    pub fn slots(&self, leg: usize) -> Range<usize> {
        match self.level {
            Level::Concat | Level::Raid0 => leg..leg + 1,
            Level::Raid1 => 0..self.members,
            Level::Raid10 => leg * 2..leg * 2 + 2,
        }
    }

    /// The leg of member `slot`.
    pub fn leg_of(&self, slot: usize) -> usize {
        match self.level {
            Level::Concat | Level::Raid0 => slot,
            Level::Raid1 => 0,
            Level::Raid10 => slot / 2,
        }
    }

    /// Data bytes of a member of leg `leg`.
    pub fn leg_size(&self, leg: usize) -> u64 {
        self.leg_sizes[leg]
    }

    /// The array's capacity in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Call `f` with the extents of array bytes `[offset, offset + len)`, in order (the
    /// caller checked the range is inside the array).
    pub fn map(&self, offset: u64, len: u64, mut f: impl FnMut(Extent)) {
        match self.level {
            Level::Raid1 => f(Extent {
                leg: 0,
                member_off: offset,
                buf_off: 0,
                len,
            }),
            Level::Concat => {
                let mut start = 0;
                let mut done = 0;
                for (leg, &size) in self.leg_sizes.iter().enumerate() {
                    let at = offset + done;
                    if done == len {
                        break;
                    }
                    if at < start + size {
                        let n = (start + size - at).min(len - done);
                        f(Extent {
                            leg,
                            member_off: at - start,
                            buf_off: done,
                            len: n,
                        });
                        done += n;
                    }
                    start += size;
                }
            }
            Level::Raid0 | Level::Raid10 => {
                let k = self.legs() as u64;
                let mut done = 0;
                while done < len {
                    let at = offset + done;
                    let strip = at / self.strip;
                    let within = at % self.strip;
                    let n = (self.strip - within).min(len - done);
                    f(Extent {
                        leg: (strip % k) as usize,
                        member_off: (strip / k) * self.strip + within,
                        buf_off: done,
                        len: n,
                    });
                    done += n;
                }
            }
        }
    }

    /// The one extent of `[offset, offset + len)` when it lies within one strip of one leg
    /// (the common case, mapped without a callback); `None` when it spans more.
    #[inline]
    pub fn single(&self, offset: u64, len: u64) -> Option<Extent> {
        match self.shifts {
            Some((strip_shift, legs_shift)) => {
                let within = offset & (self.strip - 1);
                if within + len > self.strip {
                    return None;
                }
                let strip = offset >> strip_shift;
                Some(Extent {
                    leg: (strip & ((1 << legs_shift) - 1)) as usize,
                    member_off: ((strip >> legs_shift) << strip_shift) + within,
                    buf_off: 0,
                    len,
                })
            }
            None => self.single_by_level(offset, len),
        }
    }

    /// [`single`](Self::single) without the shifts.
    fn single_by_level(&self, offset: u64, len: u64) -> Option<Extent> {
        let one = |leg, member_off| {
            Some(Extent {
                leg,
                member_off,
                buf_off: 0,
                len,
            })
        };
        match self.level {
            Level::Raid1 => one(0, offset),
            Level::Raid0 | Level::Raid10 => {
                let (strip, within) = div_rem(offset, self.strip);
                if within + len > self.strip {
                    return None;
                }
                let (row, leg) = div_rem(strip, self.legs() as u64);
                one(leg as usize, row * self.strip + within)
            }
            Level::Concat => {
                let mut start = 0;
                for (leg, &size) in self.leg_sizes.iter().enumerate() {
                    if offset < start + size {
                        if offset + len > start + size {
                            return None;
                        }
                        return one(leg, offset - start);
                    }
                    start += size;
                }
                None
            }
        }
    }

    /// The array byte at `member_off` of leg `leg` (the inverse of [`map`](Self::map)).
    pub fn array_offset(&self, leg: usize, member_off: u64) -> u64 {
        match self.level {
            Level::Raid1 => member_off,
            Level::Concat => self.leg_sizes[..leg].iter().sum::<u64>() + member_off,
            Level::Raid0 | Level::Raid10 => {
                let row = member_off / self.strip;
                (row * self.legs() as u64 + leg as u64) * self.strip + member_off % self.strip
            }
        }
    }
}

/// `(n / d, n % d)`, by shift and mask when `d` is a power of two (strip sizes always are,
/// leg counts often): the per-I/O mapping then costs no division.
fn div_rem(n: u64, d: u64) -> (u64, u64) {
    if d.is_power_of_two() {
        (n >> d.trailing_zeros(), n & (d - 1))
    } else {
        (n / d, n % d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift: reproducible "random" cases without a dependency.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    fn layouts() -> Vec<Layout> {
        vec![
            Layout::new(Level::Concat, 4096, &[3 * 4096, 5 * 4096, 4096]),
            Layout::new(Level::Raid0, 4096, &[8 * 4096, 9 * 4096, 8 * 4096]),
            Layout::new(Level::Raid0, 8192, &[64 * 1024]),
            Layout::new(Level::Raid1, 4096, &[40960, 36864]),
            Layout::new(Level::Raid10, 4096, &[32768; 6]),
        ]
    }

    /// Property: every byte range maps to extents that tile the request in order, each
    /// inside one strip of one leg, and each extent's bytes are exactly the array bytes the
    /// inverse mapping gives; byte by byte, small layouts are checked exhaustively.
    #[test]
    fn every_range_maps_to_exactly_the_member_extents_it_covers() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for l in layouts() {
            let size = l.size();
            assert!(size > 0);
            // exhaustive for single bytes: the map is a bijection onto the legs' data
            let mut seen = std::collections::HashSet::new();
            for b in 0..size {
                let mut got = Vec::new();
                l.map(b, 1, |e| got.push(e));
                assert_eq!(got.len(), 1, "{l:?} byte {b}");
                let e = got[0];
                assert!(e.member_off < l.leg_size(e.leg));
                assert_eq!(l.array_offset(e.leg, e.member_off), b);
                assert!(seen.insert((e.leg, e.member_off)), "two bytes on one place");
            }
            for _ in 0..2000 {
                let off = rng(&mut seed) % size;
                let len = 1 + rng(&mut seed) % (size - off);
                let mut next = 0;
                l.map(off, len, |e| {
                    assert_eq!(e.buf_off, next, "{l:?} {off}+{len}: gap or overlap");
                    assert!(e.len > 0);
                    next += e.len;
                    if l.level.striped() {
                        assert_eq!(
                            e.member_off / l.strip,
                            (e.member_off + e.len - 1) / l.strip,
                            "crosses a strip"
                        );
                    }
                    assert!(e.member_off + e.len <= l.leg_size(e.leg));
                    // first and last byte of the extent map back to the request's bytes
                    assert_eq!(l.array_offset(e.leg, e.member_off), off + e.buf_off);
                    assert_eq!(
                        l.array_offset(e.leg, e.member_off + e.len - 1),
                        off + e.buf_off + e.len - 1
                    );
                });
                assert_eq!(next, len, "{l:?} {off}+{len}: not covered");
                // the one-extent shortcut agrees with the full mapping
                let mut all = Vec::new();
                l.map(off, len, |e| all.push(e));
                match l.single(off, len) {
                    Some(e) => assert_eq!(all, vec![e], "{l:?} {off}+{len}"),
                    None => assert!(all.len() > 1, "{l:?} {off}+{len}: one extent missed"),
                }
            }
        }
    }

    #[test]
    fn sizes_and_member_counts() {
        assert_eq!(
            Layout::new(Level::Raid0, 65536, &[1 << 20, 1 << 20]).size(),
            2 << 20
        );
        assert_eq!(
            Layout::new(Level::Raid0, 65536, &[(1 << 20) + 4096, 1 << 20]).size(),
            2 << 20
        );
        assert_eq!(
            Layout::new(Level::Raid1, 65536, &[1 << 20, 2 << 20]).size(),
            1 << 20
        );
        assert_eq!(
            Layout::new(Level::Raid10, 65536, &[1 << 20; 4]).size(),
            2 << 20
        );
        assert_eq!(
            Layout::new(Level::Concat, 65536, &[1 << 20, 3 << 20]).size(),
            4 << 20
        );
        assert!(Level::Raid1.check_members(1).is_err());
        assert!(Level::Raid1.check_members(5).is_err());
        assert!(Level::Raid10.check_members(5).is_err());
        assert!(Level::Raid10.check_members(4).is_ok());
        assert!(Level::Raid0.check_members(17).is_err());
        assert!("raid5".parse::<Level>().is_err());
        let l = Layout::new(Level::Raid10, 4096, &[1 << 20; 4]);
        assert_eq!((l.slots(1), l.leg_of(3)), (2..4, 1));
    }
}
