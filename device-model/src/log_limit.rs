//! Rate-limited logging for messages a guest, client or network peer can trigger at will:
//! each call site logs at most [`BURST`] messages per [`WINDOW_SECS`], then one line saying
//! how many it suppressed. A tenant can fill neither the log nor the disk.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

/// Messages per call site per window.
pub const BURST: u32 = 10;
/// Window length in seconds.
pub const WINDOW_SECS: u64 = 10;

fn now_secs() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

/// One call site's budget.
#[derive(Debug)]
pub struct RateLimit {
    window: AtomicU64,
    count: AtomicU32,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// A fresh budget (for a `static`).
    pub const fn new() -> Self {
        Self {
            window: AtomicU64::new(0),
            count: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// May this message be logged? `Some(n)`: yes, after `n` suppressed ones.
    pub fn allow(&self) -> Option<u64> {
        let w = now_secs() / WINDOW_SECS + 1;
        if self.window.swap(w, Ordering::AcqRel) != w {
            self.count.store(0, Ordering::Release);
        }
        if self.count.fetch_add(1, Ordering::AcqRel) < BURST {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// `log::log!` at `level`, rate limited per call site ([`RateLimit`]).
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::RateLimit = $crate::log_limit::RateLimit::new();
        if let Some(suppressed) = LIMIT.allow() {
            if suppressed > 0 {
                log::log!($level, "{} ({suppressed} similar messages suppressed)", format_args!($($arg)+));
            } else {
                log::log!($level, $($arg)+);
            }
        }
    }};
}

/// `log::warn!`, rate limited per call site.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::log_limited!(log::Level::Warn, $($arg)+) };
}

/// `log::error!`, rate limited per call site.
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => { $crate::log_limited!(log::Level::Error, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_silence_with_a_count() {
        let rl = RateLimit::new();
        for _ in 0..BURST {
            assert_eq!(rl.allow(), Some(0));
        }
        assert_eq!(rl.allow(), None);
        assert_eq!(rl.allow(), None);
        assert_eq!(rl.suppressed.load(Ordering::Relaxed), 2);
    }
}
