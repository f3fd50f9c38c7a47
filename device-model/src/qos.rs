//! Per-controller QoS: IOPS and bandwidth limits enforced in the data plane with token
//! buckets, so one tenant's controller cannot take the whole backend from the others.
//!
//! The reactor checks the buckets before it fetches an I/O command (admin commands are never
//! held back). A command is charged one operation when fetched and its data length when its
//! size is known; the byte bucket may go into debt for one large command, and fetching waits
//! until the debt is paid, so the long-run rate is the limit. Buckets hold 50 ms of tokens:
//! a short burst, no long one. Limits change at run time through [`QosControl`], which the
//! reactor polls with one atomic load per pass.

// rates and byte counts far below 2^52: f64 holds them exactly
#![allow(clippy::cast_precision_loss)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Limits of one controller; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QosLimits {
    /// I/O commands per second.
    pub iops: Option<u64>,
    /// Data bytes per second (reads and writes).
    pub bytes_per_sec: Option<u64>,
}

/// The control plane's handle on a controller's limits (shared with its reactor).
#[derive(Debug, Default)]
pub struct QosControl {
    iops: AtomicU64,
    bps: AtomicU64,
    generation: AtomicU64,
}

impl QosControl {
    /// Limits starting at `l`.
    pub fn new(l: QosLimits) -> Self {
        let c = Self::default();
        c.set(l);
        c
    }

    /// Change the limits; the reactor applies them at its next pass.
    pub fn set(&self, l: QosLimits) {
        self.iops.store(l.iops.unwrap_or(0), Ordering::Relaxed);
        self.bps
            .store(l.bytes_per_sec.unwrap_or(0), Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The limits now.
    pub fn get(&self) -> QosLimits {
        let n = |v: u64| (v != 0).then_some(v);
        QosLimits {
            iops: n(self.iops.load(Ordering::Relaxed)),
            bytes_per_sec: n(self.bps.load(Ordering::Relaxed)),
        }
    }

    /// Counts changes.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// One token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
}

impl Bucket {
    fn new(rate: u64, min_burst: f64) -> Self {
        let rate = rate as f64;
        let burst = (rate / 20.0).max(min_burst);
        Self {
            rate,
            burst,
            tokens: burst,
        }
    }

    fn refill(&mut self, secs: f64) {
        self.tokens = (self.tokens + self.rate * secs).min(self.burst);
    }
}

/// The reactor's side: buckets refilled lazily from the clock.
#[derive(Debug, Default)]
pub(crate) struct Qos {
    ops: Option<Bucket>,
    bytes: Option<Bucket>,
    last: Option<Instant>,
    seen: u64,
}

impl Qos {
    /// Pick up new limits from `control` if they changed (one atomic load otherwise).
    pub(crate) fn sync(&mut self, control: &QosControl) {
        let g = control.generation();
        if g == self.seen {
            return;
        }
        self.seen = g;
        let l = control.get();
        self.ops = l.iops.map(|r| Bucket::new(r, 1.0));
        self.bytes = l.bytes_per_sec.map(|r| Bucket::new(r, 4096.0));
        self.last = None;
    }

    /// Whether another I/O command may be fetched now; if so it is counted against the
    /// command rate (one branch without limits).
    #[inline]
    pub(crate) fn take_op(&mut self) -> bool {
        (self.ops.is_none() && self.bytes.is_none()) || self.take_op_limited()
    }

    /// [`take_op`](Self::take_op) under a limit.
    #[cold]
    fn take_op_limited(&mut self) -> bool {
        let admitted = self.admit_limited();
        if admitted && let Some(b) = &mut self.ops {
            b.tokens -= 1.0;
        }
        admitted
    }

    /// Whether the buckets hold a command's tokens, refilled from the clock.
    fn admit_limited(&mut self) -> bool {
        let now = Instant::now();
        let secs = self
            .last
            .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        self.last = Some(now);
        if let Some(b) = &mut self.ops {
            b.refill(secs);
        }
        if let Some(b) = &mut self.bytes {
            b.refill(secs);
        }
        self.ops.is_none_or(|b| b.tokens >= 1.0) && self.bytes.is_none_or(|b| b.tokens >= 0.0)
    }

    /// An I/O command moves `bytes` of data.
    pub(crate) fn charge_bytes(&mut self, bytes: u64) {
        if let Some(b) = &mut self.bytes {
            b.tokens -= bytes as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_admits_its_rate_and_no_more() {
        let c = QosControl::new(QosLimits {
            iops: Some(1000),
            bytes_per_sec: None,
        });
        let mut q = Qos::default();
        q.sync(&c);
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed().as_millis() < 200 {
            if q.take_op() {
                n += 1;
            }
        }
        // 200 ms at 1000/s plus a 50 ms burst
        assert!((190..=265).contains(&n), "{n} admitted");
        // unlimited again at run time
        c.set(QosLimits::default());
        q.sync(&c);
        assert!((0..10_000).all(|_| q.take_op()));
        assert_eq!(c.get(), QosLimits::default());
    }

    #[test]
    fn bytes_go_into_debt_for_one_large_command() {
        let c = QosControl::new(QosLimits {
            iops: None,
            bytes_per_sec: Some(1 << 20),
        });
        let mut q = Qos::default();
        q.sync(&c);
        assert!(q.take_op());
        q.charge_bytes(1 << 20); // a whole second's worth
        assert!(!q.take_op(), "the debt holds the next command back");
    }
}
