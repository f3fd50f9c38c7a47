//! Interrupt Coalescing (NVMe base 2.0 §5.27.1.9, feature 08h; per-vector opt-out through
//! Interrupt Vector Configuration, feature 09h): a CQ's interrupt is held until THR + 1
//! completions are waiting or the oldest has waited TIME x 100 us, whichever comes first.
//! TIME = 0 means no delay, so coalescing is off. The admin queue's vector is never
//! coalesced.
//!
//! The power-on value comes from the controller configuration (hosts such as Linux never set
//! it) and is applied adaptively: when the host has a single command outstanding on the
//! queue and the previous interrupt covered a single completion (QD1: the host waits for
//! exactly this one) the interrupt fires at once, so only a host streaming several commands
//! pays the bounded delay, and gets fewer interrupts. (The previous batch matters because a
//! fast backend completes a streaming host's commands one by one as they arrive, so the
//! outstanding count alone looks like QD1; once streaming, batches stay above one until the
//! host really drops to one command.)
//! Once the host sets feature 08h itself, its values apply as the spec describes.

use std::time::{Duration, Instant};

/// Aggregation threshold and time, as in feature 08h dword 11.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coalescing {
    /// Completions that trigger the interrupt, 0's based.
    pub threshold: u8,
    /// Longest hold, in 100 us units (0 = coalescing off).
    pub time: u8,
}

impl Coalescing {
    /// From feature 08h dword 11.
    pub fn from_dword(v: u32) -> Self {
        Self {
            threshold: v as u8,
            time: (v >> 8) as u8,
        }
    }

    /// Feature 08h dword 11.
    pub fn dword(self) -> u32 {
        u32::from(self.threshold) | (u32::from(self.time) << 8)
    }

    /// Coalescing is in effect.
    pub fn enabled(self) -> bool {
        self.time != 0
    }

    /// Should an interrupt with `pending` completions, the oldest posted at `since`, fire at
    /// `now`?
    pub fn due(self, pending: u32, since: Instant, now: Instant) -> bool {
        pending > u32::from(self.threshold)
            || now.saturating_duration_since(since)
                >= Duration::from_micros(100 * u64::from(self.time))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_or_time_whichever_first() {
        let c = Coalescing::from_dword(0x0207); // 8 entries, 200 us
        assert_eq!(c.dword(), 0x0207);
        let t0 = Instant::now();
        assert!(!c.due(1, t0, t0));
        assert!(!c.due(8 - 1, t0, t0 + Duration::from_micros(199)));
        assert!(c.due(8, t0, t0));
        assert!(c.due(1, t0, t0 + Duration::from_micros(200)));
        assert!(
            !Coalescing::from_dword(0x00ff).enabled(),
            "TIME 0: no delay"
        );
    }
}
