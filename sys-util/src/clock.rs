//! A cheap per-I/O clock: the CPU's time-stamp counter where it is invariant (x86_64 with
//! `constant_tsc` and `nonstop_tsc`), else `Instant`. `clock_gettime` costs ~20 ns through
//! the vDSO, which a profile of `vnvme perf` showed as 40 % of the client's cycles at 5 M
//! IOPS; RDTSC costs a few. Ticks are converted to nanoseconds once, at the end, with a
//! rate measured against `Instant` over the run ([`Calibration`]), or with the rate
//! measured once per process ([`rate`]) where a fixed conversion is wanted (the daemon's
//! latency histograms, whose bucket edges are nanoseconds).

#![allow(clippy::cast_precision_loss)] // rates and durations far below 2^52

use std::sync::OnceLock;
use std::time::Instant;

fn invariant_tsc() -> bool {
    static YES: OnceLock<bool> = OnceLock::new();
    *YES.get_or_init(|| {
        cfg!(target_arch = "x86_64")
            && std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
                c.lines()
                    .find(|l| l.starts_with("flags"))
                    .is_some_and(|l| l.contains(" constant_tsc") && l.contains(" nonstop_tsc"))
            })
    })
}

fn origin() -> Instant {
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now)
}

/// Current time in ticks (TSC cycles, or nanoseconds without an invariant TSC).
#[inline]
pub fn ticks() -> u64 {
    if invariant_tsc()
        && let Some(t) = crate::process::read_tsc()
    {
        return t;
    }
    origin().elapsed().as_nanos() as u64
}

/// Measures nanoseconds per tick between `start` and the call to [`Calibration::finish`].
#[derive(Clone, Copy, Debug)]
pub struct Calibration {
    instant: Instant,
    ticks: u64,
}

impl Calibration {
    /// Start measuring (call [`invariant_tsc`]-dependent [`ticks`] once first so its
    /// detection is not timed).
    pub fn start() -> Self {
        let _ = ticks();
        Self {
            instant: Instant::now(),
            ticks: ticks(),
        }
    }

    /// Nanoseconds per tick since `start`.
    pub fn finish(self) -> f64 {
        let ns = self.instant.elapsed().as_nanos() as f64;
        let t = ticks().wrapping_sub(self.ticks) as f64;
        if t <= 0.0 { 1.0 } else { ns / t }
    }
}

/// Ticks to nanoseconds as a 32.32 fixed-point factor: `ns = ticks * q32 >> 32`, one
/// multiply on a data path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TickRate {
    q32: u64,
}

impl TickRate {
    /// Exactly one nanosecond per tick (the `Instant` fallback of [`ticks`]).
    pub const NANOSECONDS: TickRate = TickRate { q32: 1 << 32 };

    /// The rate of `ns_per_tick` nanoseconds per tick.
    pub fn from_ns_per_tick(ns_per_tick: f64) -> Self {
        let q = (ns_per_tick * (1u64 << 32) as f64).round();
        Self {
            q32: if q.is_finite() && q >= 1.0 {
                q.min(u64::MAX as f64) as u64
            } else {
                1 << 32
            },
        }
    }

    /// Nanoseconds in `ticks` (saturating).
    #[inline]
    pub fn ns(self, ticks: u64) -> u64 {
        let ns = (u128::from(ticks) * u128::from(self.q32)) >> 32;
        u64::try_from(ns).unwrap_or(u64::MAX)
    }
}

/// The rate of [`ticks`], measured once per process against `Instant` over 10 ms (the first
/// caller waits that long; the error is in the parts per hundred thousand).
pub fn rate() -> TickRate {
    static RATE: OnceLock<TickRate> = OnceLock::new();
    *RATE.get_or_init(|| {
        if !invariant_tsc() || crate::process::read_tsc().is_none() {
            return TickRate::NANOSECONDS;
        }
        let c = Calibration::start();
        std::thread::sleep(std::time::Duration::from_millis(10));
        TickRate::from_ns_per_tick(c.finish())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_advance_and_calibrate() {
        let c = Calibration::start();
        let a = ticks();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = ticks();
        assert!(b > a);
        let ns_per_tick = c.finish();
        let ms = (b - a) as f64 * ns_per_tick / 1e6;
        assert!((15.0..200.0).contains(&ms), "{ms} ms");
    }

    #[test]
    fn fixed_rate_converts() {
        assert_eq!(TickRate::NANOSECONDS.ns(12345), 12345);
        let r = TickRate::from_ns_per_tick(0.25); // a 4 GHz counter
        assert_eq!(r.ns(4000), 1000);
        assert_eq!(TickRate::from_ns_per_tick(f64::NAN), TickRate::NANOSECONDS);
        assert_eq!(r.ns(u64::MAX), u64::MAX / 4);
        let a = ticks();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let ms = rate().ns(ticks() - a) as f64 / 1e6;
        assert!((15.0..200.0).contains(&ms), "{ms} ms");
    }
}
