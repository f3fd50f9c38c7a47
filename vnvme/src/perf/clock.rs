//! A cheap per-I/O clock: the CPU's time-stamp counter where it is invariant (x86_64 with
//! `constant_tsc` and `nonstop_tsc`), else `Instant`. `clock_gettime` costs ~20 ns through
//! the vDSO, which a profile of `vnvme perf` showed as 40 % of the client's cycles at 5 M
//! IOPS; RDTSC costs a few. Ticks are converted to nanoseconds once, at the end, with a
//! rate measured against `Instant` over the run.

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
        && let Some(t) = sys_util::process::read_tsc()
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
}
