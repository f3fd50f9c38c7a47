//! Latency histogram with bounded relative error: log2 buckets split into 32 linear
//! sub-buckets (about 3 % resolution), fixed size, no allocation while recording.

const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = 64 * SUB;

/// Latencies in nanoseconds.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("min", &self.min)
            .field("max", &self.max)
            .finish()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: Box::new([0; BUCKETS]),
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let msb = v.ilog2();
    let shift = msb - SUB_BITS;
    let sub = (v >> shift) as usize & (SUB - 1);
    ((shift as usize + 1) << SUB_BITS) | sub
}

/// Lower bound of bucket `i` (the value reported for a percentile).
fn lower(i: usize) -> u64 {
    let group = i >> SUB_BITS;
    let sub = (i & (SUB - 1)) as u64;
    if group == 0 {
        return sub;
    }
    let shift = group as u32 - 1;
    ((SUB as u64) | sub) << shift
}

impl Histogram {
    /// Record one latency.
    pub fn record(&mut self, ns: u64) {
        self.counts[index(ns)] += 1;
        self.total += 1;
        self.sum += u128::from(ns);
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    /// Add another histogram's samples.
    pub fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(o.counts.iter()) {
            *a += b;
        }
        self.total += o.total;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Mean in ns (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// Smallest and largest sample in ns (0, 0 when empty).
    pub fn min_max(&self) -> (u64, u64) {
        if self.total == 0 {
            (0, 0)
        } else {
            (self.min, self.max)
        }
    }

    /// The latency at percentile `p` (0..=100) in ns, bucket resolution.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return lower(i).clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in [0u64, 1, 31, 32, 33, 100, 1000, 4095, 1 << 20, u64::MAX >> 2] {
            let i = index(v);
            assert!(i >= last, "{v}");
            last = i;
            let lo = lower(i);
            assert!(
                lo <= v && (v - lo) as f64 <= v as f64 * 0.04 + 1.0,
                "{v} -> {lo}"
            );
        }
    }

    #[test]
    fn percentiles() {
        let mut h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.percentile(50.0) as f64;
        assert!((p50 - 500_000.0).abs() < 500_000.0 * 0.04, "{p50}");
        let p100 = h.percentile(100.0);
        assert!(
            p100 <= 1_000_000 && p100 as f64 >= 1_000_000.0 * 0.96,
            "{p100}"
        );
        assert_eq!(h.min_max(), (1000, 1_000_000));
    }
}
