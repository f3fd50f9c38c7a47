//! Which pages of a kept RAM namespace hold data. Reading a hole of a shared memfd through a
//! mapping allocates a page (where a private anonymous mapping maps the zero page), so a
//! backend on kept RAM serves reads of never-written pages as zeroes without touching them.

/// One bit per page of a namespace: set once the page may hold data.
#[derive(Debug)]
pub(crate) struct WrittenPages {
    bits: Vec<u64>,
    shift: u32,
}

impl WrittenPages {
    /// A map of `size` bytes in pages of `page` bytes (a power of two), none written.
    pub(crate) fn new(size: u64, page: u64) -> Self {
        let pages = size.div_ceil(page);
        Self {
            bits: vec![0; pages.div_ceil(64) as usize],
            shift: page.trailing_zeros(),
        }
    }

    /// The pages `[start, end)` of the byte range touches.
    fn pages(&self, start: u64, end: u64) -> std::ops::Range<u64> {
        if end <= start {
            return 0..0;
        }
        (start >> self.shift)..((end - 1) >> self.shift) + 1
    }

    fn get(&self, p: u64) -> bool {
        self.bits
            .get((p / 64) as usize)
            .is_some_and(|w| w >> (p % 64) & 1 != 0)
    }

    fn put(&mut self, p: u64, on: bool) {
        if let Some(w) = self.bits.get_mut((p / 64) as usize) {
            if on {
                *w |= 1 << (p % 64);
            } else {
                *w &= !(1 << (p % 64));
            }
        }
    }

    /// Every page the bytes `[start, end)` touch may hold data.
    pub(crate) fn mark(&mut self, start: u64, end: u64) {
        for p in self.pages(start, end) {
            self.put(p, true);
        }
    }

    /// The whole pages of `[start, end)` hold none (punched): `start` and `end` page aligned.
    pub(crate) fn clear(&mut self, start: u64, end: u64) {
        for p in self.pages(start, end) {
            self.put(p, false);
        }
    }

    /// Every page `[start, end)` touches may hold data (a plain copy serves the read).
    pub(crate) fn all(&self, start: u64, end: u64) -> bool {
        self.pages(start, end).all(|p| self.get(p))
    }

    /// No page `[start, end)` touches holds data (it reads as zeroes already).
    pub(crate) fn none(&self, start: u64, end: u64) -> bool {
        !self.pages(start, end).any(|p| self.get(p))
    }

    /// The pieces of `[start, end)` in order, each with whether its pages may hold data.
    pub(crate) fn runs(&self, start: u64, end: u64, mut f: impl FnMut(u64, u64, bool)) {
        let mut at = start;
        while at < end {
            let written = self.get(at >> self.shift);
            let mut next = ((at >> self.shift) + 1) << self.shift;
            while next < end && self.get(next >> self.shift) == written {
                next += 1 << self.shift;
            }
            let next = next.min(end);
            f(at, next, written);
            at = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_marked_cleared_and_walked() {
        let mut w = WrittenPages::new(64 << 12, 4096);
        assert!(!w.all(0, 1));
        w.mark(4096 + 10, 3 * 4096 + 1); // pages 1..=3
        assert!(w.all(4096, 4 * 4096));
        assert!(!w.all(0, 4 * 4096));
        w.clear(2 * 4096, 3 * 4096);
        let mut runs = Vec::new();
        w.runs(100, 5 * 4096, |a, b, on| runs.push((a, b, on)));
        assert_eq!(
            runs,
            [
                (100, 4096, false),
                (4096, 2 * 4096, true),
                (2 * 4096, 3 * 4096, false),
                (3 * 4096, 4 * 4096, true),
                (4 * 4096, 5 * 4096, false),
            ]
        );
        w.mark(63 * 4096, 64 * 4096);
        assert!(w.all(63 * 4096, 64 * 4096));
        w.mark(64 * 4096, 65 * 4096); // past the end: ignored
        assert!(w.all(0, 0), "an empty range");
    }
}
