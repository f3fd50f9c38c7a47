//! The logical blocks of a namespace marked invalid by Write Uncorrectable (NVM command set
//! 1.0 §3.2.7): reads (Read, Compare, Verify) touching them fail with Unrecovered Read Error
//! until they are written (Write, Write Zeroes) or deallocated (Dataset Management, Format
//! NVM). Get LBA Status and the LBA Status Information log page report them
//! ([`crate::admin`]).
//!
//! Kept as a sorted set of disjoint, non-adjacent LBA ranges. A guest cannot make it grow
//! without bound: at most [`MAX_RANGES`] ranges per namespace. A Write Uncorrectable that would
//! need more is refused (nothing is marked); a write or deallocation that splits a range when
//! the set is full keeps the longer piece and lets the shorter one read again (logged). The hot
//! path only asks [`Uncorrectable::is_empty`] until a guest used Write Uncorrectable.

/// Disjoint uncorrectable ranges one namespace may have (16 bytes each).
pub const MAX_RANGES: usize = 1024;

/// The uncorrectable LBA ranges of one namespace.
#[derive(Debug, Default, Clone)]
pub struct Uncorrectable {
    /// `[start, end)` LBA ranges, sorted, disjoint and not adjacent.
    ranges: Vec<(u64, u64)>,
    /// Bumped on every change (LBA Status Generation Counter).
    generation: u16,
}

/// The set already holds [`MAX_RANGES`] ranges and the new one would add one more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl Uncorrectable {
    /// True when no block is uncorrectable: the only question the hot path asks.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// True when a block of `[slba, slba + nlb)` is uncorrectable.
    pub fn overlaps(&self, slba: u64, nlb: u64) -> bool {
        let end = slba.saturating_add(nlb);
        let i = self.ranges.partition_point(|r| r.1 <= slba);
        self.ranges.get(i).is_some_and(|r| r.0 < end)
    }

    /// Mark `[slba, slba + nlb)` uncorrectable, merged with the ranges it touches.
    pub fn insert(&mut self, slba: u64, nlb: u64) -> Result<(), Full> {
        if nlb == 0 {
            return Ok(());
        }
        let (mut s, mut e) = (slba, slba.saturating_add(nlb));
        // ranges overlapping or adjacent to [s, e)
        let i = self.ranges.partition_point(|r| r.1 < s);
        let j = self.ranges.partition_point(|r| r.0 <= e);
        if i == j && self.ranges.len() >= MAX_RANGES {
            return Err(Full);
        }
        if i < j {
            s = s.min(self.ranges[i].0);
            e = e.max(self.ranges[j - 1].1);
        }
        self.ranges.splice(i..j, [(s, e)]);
        self.generation = self.generation.wrapping_add(1);
        Ok(())
    }

    /// `[slba, slba + nlb)` was written or deallocated: readable again. Returns true when
    /// the set was full and a split piece of another range was let go as well.
    pub fn clear(&mut self, slba: u64, nlb: u64) -> bool {
        let (s, e) = (slba, slba.saturating_add(nlb));
        let i = self.ranges.partition_point(|r| r.1 <= s);
        let j = self.ranges.partition_point(|r| r.0 < e);
        if i >= j {
            return false;
        }
        let first = self.ranges[i];
        let last = self.ranges[j - 1];
        let pieces = [(first.0, s), (e, last.1)];
        let mut keep = [first.0 < s, last.1 > e];
        let mut lossy = false;
        let grows = usize::from(keep[0]) + usize::from(keep[1]) > j - i;
        if grows && self.ranges.len() >= MAX_RANGES {
            // one range split in two with no room: keep the longer piece
            let shorter = usize::from(pieces[1].1 - pieces[1].0 < pieces[0].1 - pieces[0].0);
            keep[shorter] = false;
            lossy = true;
        }
        let kept = (0..2).filter(|&k| keep[k]).map(|k| pieces[k]);
        self.ranges.splice(i..j, kept);
        self.generation = self.generation.wrapping_add(1);
        lossy
    }

    /// Every block readable again (Format NVM).
    pub fn clear_all(&mut self) {
        if !self.ranges.is_empty() {
            self.ranges.clear();
            self.generation = self.generation.wrapping_add(1);
        }
    }

    /// The ranges as (first LBA, end LBA exclusive), in LBA order.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// The ranges overlapping `[slba, end)`, clipped to it, in LBA order.
    pub fn within(&self, slba: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let i = self.ranges.partition_point(|r| r.1 <= slba);
        self.ranges[i..]
            .iter()
            .take_while(move |r| r.0 < end)
            .map(move |r| (r.0.max(slba), r.1.min(end)))
    }

    /// Uncorrectable blocks in total.
    pub fn blocks(&self) -> u64 {
        self.ranges.iter().map(|r| r.1 - r.0).sum()
    }

    /// Changes so far (wrapping).
    pub fn generation(&self) -> u16 {
        self.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_merges_and_clear_splits() {
        let mut u = Uncorrectable::default();
        assert!(u.is_empty() && !u.overlaps(0, u64::MAX));
        u.insert(10, 5).unwrap();
        u.insert(20, 5).unwrap();
        assert_eq!(u.ranges(), [(10, 15), (20, 25)]);
        assert!(u.overlaps(14, 1) && !u.overlaps(15, 5) && u.overlaps(0, 11));
        u.insert(15, 5).unwrap(); // adjacent on both sides: one range
        assert_eq!(u.ranges(), [(10, 25)]);
        assert!(!u.clear(12, 2));
        assert_eq!(u.ranges(), [(10, 12), (14, 25)]);
        assert!(!u.clear(0, 11));
        assert_eq!(u.ranges(), [(11, 12), (14, 25)]);
        assert_eq!(u.within(0, 20).collect::<Vec<_>>(), [(11, 12), (14, 20)]);
        assert_eq!(u.blocks(), 12);
        assert!(!u.clear(11, 100));
        assert!(u.is_empty());
        let g = u.generation();
        u.clear_all();
        assert_eq!(u.generation(), g, "nothing changed");
        u.insert(u64::MAX - 1, 10).unwrap(); // saturates, no overflow
        assert!(u.overlaps(u64::MAX - 1, 1));
    }

    #[test]
    fn the_set_is_bounded() {
        let mut u = Uncorrectable::default();
        for k in 0..MAX_RANGES as u64 {
            u.insert(k * 4, 2).unwrap();
        }
        assert_eq!(u.insert(1 << 40, 1), Err(Full), "a new range past the cap");
        u.insert(2, 2).unwrap(); // [0, 2) and [4, 6) merge: needs no room
        assert_eq!(u.ranges().len(), MAX_RANGES - 1);
        u.insert(1 << 40, 1).unwrap();
        // a write in the middle of a full set's range keeps the longer piece only
        u.insert(100_000, 10).unwrap_err();
        let last = *u.ranges().last().unwrap();
        assert_eq!(last, (1 << 40, (1 << 40) + 1));
        u.clear(0, 1); // [0, 6) becomes [1, 6): no split
        assert_eq!(u.ranges()[0], (1, 6));
        assert!(u.clear(2, 1), "split with no room: lossy");
        assert_eq!(u.ranges()[0], (3, 6), "the longer piece kept");
        assert_eq!(u.ranges().len(), MAX_RANGES);
    }
}
