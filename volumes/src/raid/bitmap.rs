//! The write-intent bitmap of a mirrored array: one bit per region of the members' data
//! area, kept in the reserved area after the superblock.
//!
//! Ordering, the point of it: a write may reach the members only once its regions' bits are
//! **on disk** (persisted in a numbered *round* of bitmap block writes to every member); a
//! bit is cleared only later, lazily, once no write to its region is in flight and every
//! mirror got every write (else the region stays *sticky*: a member missed it, and a
//! returning member gets those regions copied). After a crash, the regions whose bits are
//! set are the only ones that can differ between mirrors.
//!
//! This module is the bookkeeping only (no I/O): the array issues the rounds it asks for.

/// Bytes of one bitmap block (the unit written).
pub const BLOCK: u64 = 4096;
const BITS_PER_BLOCK: u64 = BLOCK * 8;

/// Default bytes one bit covers.
pub const DEFAULT_REGION: u64 = 1 << 20;

/// The region size for members of `data` bytes: the default, or larger so the bitmap fits
/// `max_bytes`.
pub fn region_size(data: u64, max_bytes: u64) -> u64 {
    let mut r = DEFAULT_REGION;
    while data.div_ceil(r) > max_bytes * 8 {
        r *= 2;
    }
    r
}

fn get(v: &[u64], i: u64) -> bool {
    v[(i / 64) as usize] & (1 << (i % 64)) != 0
}
fn set(v: &mut [u64], i: u64, on: bool) {
    let w = &mut v[(i / 64) as usize];
    if on {
        *w |= 1 << (i % 64);
    } else {
        *w &= !(1 << (i % 64));
    }
}

/// The bitmap's state.
#[derive(Debug)]
pub struct Bitmap {
    region: u64,
    regions: u64,
    /// Bits as they should be (dirty or sticky).
    bits: Vec<u64>,
    /// Regions a member missed a write to (or that must be resynced): never cleared lazily.
    sticky: Vec<u64>,
    /// Bits as the last issued round wrote them.
    disk: Vec<u64>,
    /// Writes in flight per region.
    active: Vec<u32>,
    /// The round that last wrote each block.
    block_round: Vec<u64>,
    /// Blocks changed since their last round.
    dirty_blocks: Vec<u64>,
    any_dirty: bool,
    /// Regions that may be cleared at the next tick.
    candidates: Vec<u64>,
    is_candidate: Vec<u64>,
    /// Candidates already seen idle at the previous tick (cleared at this one).
    aged: Vec<u64>,
    issued: u64,
    durable: u64,
}

impl Bitmap {
    /// A bitmap for `data` bytes per member in regions of `region` bytes, all clear.
    pub fn new(data: u64, region: u64) -> Self {
        let regions = data.div_ceil(region).max(1);
        let words = regions.div_ceil(64) as usize;
        let blocks = regions.div_ceil(BITS_PER_BLOCK) as usize;
        Self {
            region,
            regions,
            bits: vec![0; words],
            sticky: vec![0; words],
            disk: vec![0; words],
            active: vec![0; regions as usize],
            block_round: vec![0; blocks],
            dirty_blocks: vec![0; blocks.div_ceil(64)],
            any_dirty: false,
            candidates: Vec::new(),
            is_candidate: vec![0; words],
            aged: vec![0; words],
            issued: 0,
            durable: 0,
        }
    }

    /// Bytes per region.
    pub fn region(&self) -> u64 {
        self.region
    }
    /// Number of regions.
    pub fn regions(&self) -> u64 {
        self.regions
    }
    /// Bytes of bitmap on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.block_round.len() as u64 * BLOCK
    }
    /// The regions of member bytes `[off, off + len)`.
    pub fn regions_of(&self, off: u64, len: u64) -> (u64, u64) {
        (off / self.region, (off + len.max(1) - 1) / self.region)
    }

    /// Load the bits read from a member (OR-ed into the current ones; every set bit is
    /// sticky: its region must be resynced before it may be cleared). They are on disk.
    pub fn load(&mut self, bytes: &[u8]) {
        for r in 0..self.regions {
            let (byte, bit) = ((r / 8) as usize, r % 8);
            if byte < bytes.len() && bytes[byte] & (1 << bit) != 0 {
                set(&mut self.bits, r, true);
                set(&mut self.disk, r, true);
                set(&mut self.sticky, r, true);
            }
        }
    }

    /// Set the bits of every region as sticky (a member is to be rebuilt in full).
    pub fn set_all_sticky(&mut self) {
        for r in 0..self.regions {
            self.mark_sticky(r);
        }
    }

    /// Mark region `r` as one a member missed.
    pub fn mark_sticky(&mut self, r: u64) {
        set(&mut self.sticky, r, true);
        if !get(&self.bits, r) {
            set(&mut self.bits, r, true);
            self.dirty_block(r);
        }
    }

    /// The sticky regions, in order.
    pub fn sticky_regions(&self) -> Vec<u64> {
        (0..self.regions)
            .filter(|&r| get(&self.sticky, r))
            .collect()
    }

    /// True when region `r` is sticky.
    pub fn is_sticky(&self, r: u64) -> bool {
        get(&self.sticky, r)
    }

    /// Set bits, dirty or sticky.
    pub fn count_set(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    fn dirty_block(&mut self, r: u64) {
        let b = r / BITS_PER_BLOCK;
        set(&mut self.dirty_blocks, b, true);
        self.any_dirty = true;
    }

    /// A write to regions `first..=last` starts: the round that must be durable before it
    /// may reach the members (ready now when `<= durable()`).
    pub fn start_write(&mut self, first: u64, last: u64) -> u64 {
        let mut need = 0;
        for r in first..=last.min(self.regions - 1) {
            self.active[r as usize] += 1;
            set(&mut self.bits, r, true);
            set(&mut self.aged, r, false);
            if get(&self.disk, r) {
                need = need.max(self.block_round[(r / BITS_PER_BLOCK) as usize]);
            } else {
                self.dirty_block(r);
                need = need.max(self.issued + 1);
            }
        }
        need
    }

    /// A write to `first..=last` finished; `sticky`: some mirror did not get it.
    pub fn end_write(&mut self, first: u64, last: u64, sticky: bool) {
        for r in first..=last.min(self.regions - 1) {
            let a = &mut self.active[r as usize];
            *a = a.saturating_sub(1);
            if sticky {
                set(&mut self.sticky, r, true);
            } else if *a == 0 && !get(&self.sticky, r) {
                self.candidate(r);
            }
        }
    }

    fn candidate(&mut self, r: u64) {
        if !get(&self.is_candidate, r) {
            set(&mut self.is_candidate, r, true);
            self.candidates.push(r);
        }
    }

    /// Writes in flight to region `r`.
    pub fn active(&self, r: u64) -> u32 {
        self.active[r as usize]
    }

    /// Region `r` was resynchronized: it is no longer sticky and may be cleared.
    pub fn resynced(&mut self, r: u64) {
        set(&mut self.sticky, r, false);
        if self.active[r as usize] == 0 {
            self.candidate(r);
        }
    }

    /// The lazy clear, called at a steady tick: a candidate region idle (no write started)
    /// since the previous tick, not sticky, has its bit cleared (written at the next round);
    /// one idle for the first time is kept for the next tick. So a region being written
    /// keeps its bit (no round per write), and an idle one is clean one to two ticks after
    /// its last write. Returns how many were cleared.
    pub fn clear_idle(&mut self) -> usize {
        self.clear_candidates(false)
    }

    /// Clear every idle candidate now (a clean stop).
    pub fn clear_all_idle(&mut self) -> usize {
        self.clear_candidates(true)
    }

    fn clear_candidates(&mut self, now: bool) -> usize {
        let mut n = 0;
        let mut list = std::mem::take(&mut self.candidates);
        list.retain(|&r| {
            let idle = self.active[r as usize] == 0 && !get(&self.sticky, r);
            if !idle || !get(&self.bits, r) {
                set(&mut self.is_candidate, r, false);
                set(&mut self.aged, r, false);
                return false;
            }
            if now || get(&self.aged, r) {
                set(&mut self.bits, r, false);
                set(&mut self.is_candidate, r, false);
                set(&mut self.aged, r, false);
                let b = r / BITS_PER_BLOCK;
                set(&mut self.dirty_blocks, b, true);
                self.any_dirty = true;
                n += 1;
                return false;
            }
            set(&mut self.aged, r, true);
            true
        });
        // candidates added meanwhile (none: no other borrow) are kept
        list.append(&mut self.candidates);
        self.candidates = list;
        n
    }

    /// True when regions wait for the lazy clear.
    pub fn has_candidates(&self) -> bool {
        !self.candidates.is_empty()
    }

    /// True when blocks wait for a round and none is in flight.
    pub fn round_due(&self) -> bool {
        self.any_dirty && self.issued == self.durable
    }

    /// Start the next round: the blocks to write (their bytes by [`block_bytes`]); the
    /// round's number is [`issued`](Self::issued).
    pub fn issue(&mut self, blocks: &mut Vec<u64>) -> u64 {
        blocks.clear();
        self.issued += 1;
        for b in 0..self.block_round.len() as u64 {
            if get(&self.dirty_blocks, b) {
                set(&mut self.dirty_blocks, b, false);
                blocks.push(b);
                self.block_round[b as usize] = self.issued;
                let lo = (b * BITS_PER_BLOCK / 64) as usize;
                let hi = (((b + 1) * BITS_PER_BLOCK / 64) as usize).min(self.bits.len());
                self.disk[lo..hi].copy_from_slice(&self.bits[lo..hi]);
            }
        }
        self.any_dirty = false;
        self.issued
    }

    /// Round `round` is on every member.
    pub fn round_done(&mut self, round: u64) {
        self.durable = self.durable.max(round);
    }

    /// The last round issued.
    pub fn issued(&self) -> u64 {
        self.issued
    }
    /// The last round on disk.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// Block `b` as last issued (little-endian bit order: region r is bit r % 8 of byte
    /// r / 8).
    pub fn block_bytes(&self, b: u64, out: &mut [u8]) {
        out.fill(0);
        let first = b * BITS_PER_BLOCK;
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            let w = (first / 64) as usize + i;
            if w < self.disk.len() {
                chunk.copy_from_slice(&self.disk[w].to_le_bytes()[..chunk.len()]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_waits_for_its_bit_on_disk_and_the_bit_clears_only_after_it() {
        let mut b = Bitmap::new(64 << 20, 1 << 20);
        let need = b.start_write(2, 3);
        assert!(need > b.durable(), "not on disk yet: the write must wait");
        assert!(b.round_due());
        let mut blocks = Vec::new();
        let r = b.issue(&mut blocks);
        assert_eq!((r, blocks.as_slice()), (need, &[0u64][..]));
        // a second write to the same region while the round is in flight waits for it too
        assert_eq!(b.start_write(3, 3), r);
        assert!(!b.round_due(), "one round at a time");
        b.round_done(r);
        assert!(need <= b.durable());
        let mut bytes = [0u8; BLOCK as usize];
        b.block_bytes(0, &mut bytes);
        assert_eq!(bytes[0], 0b1100);
        // region 3 still has a write in flight: not cleared
        b.end_write(2, 3, false);
        assert_eq!(b.clear_idle(), 0, "idle for one tick only");
        assert_eq!(b.clear_idle(), 1, "region 2 only");
        b.end_write(3, 3, false);
        // a write to region 3 again: its idle time starts over
        b.start_write(3, 3);
        b.end_write(3, 3, false);
        assert_eq!(b.clear_idle(), 0);
        assert_eq!(b.clear_idle(), 1);
        assert_eq!(b.count_set(), 0);
        // the clear is written lazily
        assert!(b.round_due());
        let r2 = b.issue(&mut blocks);
        b.round_done(r2);
        b.block_bytes(0, &mut bytes);
        assert_eq!(bytes[0], 0);
        // now on disk as clear: the next write must wait for a new round
        assert!(b.start_write(2, 2) > b.durable());
    }

    #[test]
    fn a_bit_being_cleared_on_disk_is_set_again_before_a_new_write() {
        let mut b = Bitmap::new(8 << 20, 1 << 20);
        let mut blocks = Vec::new();
        b.start_write(1, 1);
        let r = b.issue(&mut blocks);
        b.round_done(r);
        b.end_write(1, 1, false);
        b.clear_all_idle();
        let clearing = b.issue(&mut blocks); // in flight: disk says clear
        let need = b.start_write(1, 1);
        assert!(
            need > clearing,
            "must wait for a round after the clearing one"
        );
        b.round_done(clearing);
        let r = b.issue(&mut blocks);
        assert_eq!(r, need);
    }

    #[test]
    fn sticky_regions_survive_the_lazy_clear_until_resynced() {
        let mut b = Bitmap::new(8 << 20, 1 << 20);
        b.start_write(0, 1);
        b.end_write(0, 1, true); // a mirror missed it
        assert_eq!(b.clear_all_idle(), 0);
        assert_eq!(b.sticky_regions(), vec![0, 1]);
        b.resynced(0);
        assert_eq!(b.clear_all_idle(), 1);
        assert_eq!(b.sticky_regions(), vec![1]);
        // loading what a member had: all sticky
        let mut c = Bitmap::new(8 << 20, 1 << 20);
        c.load(&[0b1000_0001]);
        assert_eq!(c.sticky_regions(), vec![0, 7]);
        assert!(c.start_write(7, 7) <= c.durable(), "already on disk");
    }

    #[test]
    fn region_size_grows_to_fit() {
        assert_eq!(region_size(1 << 40, 1 << 20), 1 << 20);
        assert_eq!(region_size(1 << 44, 1 << 20), 2 << 20);
        assert_eq!(region_size(1 << 46, 1 << 20), 8 << 20);
    }
}
