//! Rebuilds: what they copy (the regions, in order), how fast (the rate limit), how far they
//! are (the progress the management plane shows), and the copying itself, driven from the
//! array's `poll`: one region at a time is locked (guest writes to it wait; those in flight
//! finish first), and up to [`DEPTH`] chunks of it are in flight at once, each read from an
//! in-sync mirror and then written to the mirrors being brought up to date. Nothing waits:
//! guest I/O goes on between and beside the chunks.

use std::time::{Duration, Instant};

use device_model::backend::{GuestBufferList, IoBuffer};

/// Bytes one chunk copies (a member request's largest transfer).
pub const CHUNK: u64 = super::tags::MAX_CHILD;
/// Chunks in flight at once.
pub const DEPTH: usize = 4;
/// Why a rebuild stops for good at a clean stop.
pub(crate) const STOPPED: &str = "the array stopped";
/// Default rate limit: 200 MB/s.
pub const DEFAULT_RATE: u64 = 200_000_000;

/// Which copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebuildKind {
    /// After an unclean shutdown: make the in-sync mirrors agree on the dirty regions.
    Resync,
    /// Bring member `slot` up to date: the regions it missed (`partial`) or all of it.
    Recover { slot: usize, partial: bool },
}

impl RebuildKind {
    /// A word for listings.
    pub fn name(self) -> &'static str {
        match self {
            RebuildKind::Resync => "resync",
            RebuildKind::Recover { partial: true, .. } => "partial",
            RebuildKind::Recover { partial: false, .. } => "full",
        }
    }
}

/// A token bucket on bytes: a chunk may start when the bytes granted so far fit the rate
/// since the start (plus one chunk of burst). 0: no limit.
#[derive(Debug)]
pub struct RateLimit {
    pub bytes_per_sec: u64,
    pub(super) start: Instant,
    pub(super) granted: u64,
}

impl RateLimit {
    pub fn new(bytes_per_sec: u64, now: Instant) -> Self {
        Self {
            bytes_per_sec,
            start: now,
            granted: 0,
        }
    }

    /// Change the rate from now on.
    pub fn set(&mut self, bytes_per_sec: u64, now: Instant) {
        *self = Self::new(bytes_per_sec, now);
    }

    /// Take `bytes` if the rate allows it at `now`.
    pub fn try_take(&mut self, bytes: u64, now: Instant) -> bool {
        if self.bytes_per_sec == 0 {
            self.granted += bytes;
            return true;
        }
        let secs = now.duration_since(self.start).as_secs_f64();
        let allowed = (secs * self.bytes_per_sec as f64) as u64 + CHUNK;
        if self.granted + bytes <= allowed {
            self.granted += bytes;
            true
        } else {
            false
        }
    }
}

/// A rebuild's progress.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub kind: RebuildKind,
    /// Bytes to copy (per target), and copied so far.
    pub total: u64,
    pub copied: u64,
    pub regions: u64,
    pub regions_done: u64,
    pub elapsed: Duration,
    /// Rate limit in bytes/s (0: none).
    pub rate: u64,
    /// Done (the last rebuild, kept for listings).
    pub finished: bool,
    /// Why it stopped early, if it did.
    pub aborted: Option<String>,
}

impl Progress {
    /// Percent done.
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            return 100.0;
        }
        self.copied as f64 * 100.0 / self.total as f64
    }
    /// Seconds left at the speed so far.
    pub fn eta_secs(&self) -> Option<f64> {
        let s = self.elapsed.as_secs_f64();
        if self.copied == 0 || s <= 0.0 {
            return None;
        }
        Some((self.total - self.copied.min(self.total)) as f64 / (self.copied as f64 / s))
    }
}

/// Where one chunk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ChunkState {
    Free,
    Reading {
        leg: usize,
        off: u64,
        len: u64,
    },
    Writing {
        pending: u32,
        len: u64,
        failed: bool,
    },
}

/// One chunk's buffer, segment list and state (allocated once per array).
pub(crate) struct ChunkIo {
    pub(super) buf: IoBuffer,
    pub(super) iov: GuestBufferList,
    pub(super) state: ChunkState,
}

impl ChunkIo {
    pub(crate) fn new() -> Self {
        Self {
            buf: IoBuffer::new(CHUNK as usize),
            iov: GuestBufferList::new(),
            state: ChunkState::Free,
        }
    }
}

/// Where the current region stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RegionState {
    /// No region taken.
    Idle,
    /// Locked; waiting for the guest writes in flight to it.
    Locking,
    /// Chunks being copied.
    Copying,
}

/// A running rebuild.
pub(crate) struct Rebuild {
    pub(crate) kind: RebuildKind,
    pub(super) regions: Vec<u64>,
    pub(super) pos: usize,
    /// The next chunk of the current region: its leg and offset in the region.
    pub(super) leg: usize,
    pub(super) chunk_off: u64,
    pub(super) region: RegionState,
    pub(crate) progress: Progress,
    pub(crate) started: Instant,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_holds_a_rebuild_to_its_rate() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10 << 20, t0); // 10 MiB/s
        let mut granted = 0u64;
        // simulated clock: 2 s in 1 ms steps, asking for a chunk each step
        for ms in 0..2000u64 {
            let now = t0 + Duration::from_millis(ms);
            if r.try_take(CHUNK, now) {
                granted += CHUNK;
            }
        }
        let want = 20u64 << 20;
        assert!(
            granted <= want + CHUNK && granted >= want - 2 * CHUNK,
            "granted {granted}, want about {want}"
        );
        let mut free = RateLimit::new(0, t0);
        assert!((0..1000).all(|_| free.try_take(CHUNK, t0)));
    }

    #[test]
    fn progress_percent_and_eta() {
        let p = Progress {
            kind: RebuildKind::Recover {
                slot: 1,
                partial: true,
            },
            total: 100,
            copied: 25,
            regions: 4,
            regions_done: 1,
            elapsed: Duration::from_secs(1),
            rate: 0,
            finished: false,
            aborted: None,
        };
        assert!((p.percent() - 25.0).abs() < 1e-9);
        assert!((p.eta_secs().unwrap() - 3.0).abs() < 1e-9);
    }
}
