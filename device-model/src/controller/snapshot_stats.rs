//! The statistics in a controller's journal (`rpc stats`, metrics): saved with the slow
//! state (`snapshot_blob.rs`) at every save, and at least once a second while they move, so
//! the next worker counts on from them: exactly after a planned upgrade (the worker saves
//! after draining), as of the last save (at most about a second behind) after a crash.
//! The gauges (in flight, ready) are not carried: they describe the worker.

use std::time::{Duration, Instant};

use crate::stats::{ControllerStats, ERROR_STATUSES, HistogramSnapshot, IoSnapshot};

use super::Controller;
use super::snapshot_codec::{R, W};

/// Namespaces whose statistics are carried at most (the rest start again at zero).
const MAX_NAMESPACES: usize = 128;
/// Error statuses a saved state may count (this build knows [`ERROR_STATUSES`]).
const MAX_ERROR_STATUSES: usize = 64;
/// Poll passes between looks at the clock for a statistics save.
const POLLS_PER_LOOK: u32 = 4096;
/// Statistics that moved are saved this often at most.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// When the statistics were last saved, and how soon to look again.
#[derive(Debug)]
pub(crate) struct SaveClock {
    countdown: u32,
    at: Instant,
    /// Commands counted as of that save.
    counted: u64,
}

impl Default for SaveClock {
    fn default() -> Self {
        Self {
            countdown: POLLS_PER_LOOK,
            at: Instant::now(),
            counted: 0,
        }
    }
}

/// The statistics as an earlier worker saved them.
#[derive(Debug, Default)]
pub(super) struct SavedStats {
    /// Enables, Doorbell Buffer Configs, asynchronous events, fatal states, admin commands
    /// and admin errors.
    counters: [u64; 6],
    io: IoSnapshot,
    io_errors: Vec<u64>,
    /// By NSID.
    namespaces: Vec<(u32, IoSnapshot)>,
}

fn encode_io(w: &mut W, s: &IoSnapshot) {
    for v in [
        s.reads,
        s.writes,
        s.other,
        s.read_bytes,
        s.written_bytes,
        s.errors,
        s.latency.sum_ns,
    ] {
        w.u64(v);
    }
    for &b in &s.latency.buckets {
        w.u64(b);
    }
}

fn decode_io(r: &mut R<'_>) -> Option<IoSnapshot> {
    let mut s = IoSnapshot {
        reads: r.u64()?,
        writes: r.u64()?,
        other: r.u64()?,
        read_bytes: r.u64()?,
        written_bytes: r.u64()?,
        errors: r.u64()?,
        latency: HistogramSnapshot::default(),
    };
    s.latency.sum_ns = r.u64()?;
    for b in &mut s.latency.buckets {
        *b = r.u64()?;
    }
    Some(s)
}

/// [`SavedStats`] from untrusted bytes: counts checked, values taken as they are (they only
/// ever reach this controller's own counters).
pub(super) fn decode(r: &mut R<'_>) -> Option<SavedStats> {
    let mut counters = [0; 6];
    for c in &mut counters {
        *c = r.u64()?;
    }
    let io = decode_io(r)?;
    // another build may know more or fewer statuses: the ones past ours count as the last
    // (the catch-all), missing ones as none
    let n = r.u16()? as usize;
    if n > MAX_ERROR_STATUSES {
        return None;
    }
    let mut io_errors = vec![0u64; ERROR_STATUSES.len()];
    for i in 0..n {
        let v = r.u64()?;
        let at = i.min(ERROR_STATUSES.len() - 1);
        io_errors[at] = io_errors[at].saturating_add(v);
    }
    let n = r.u16()? as usize;
    if n > MAX_NAMESPACES {
        return None;
    }
    let mut namespaces = Vec::with_capacity(n);
    for _ in 0..n {
        namespaces.push((r.u32()?, decode_io(r)?));
    }
    Some(SavedStats {
        counters,
        io,
        io_errors,
        namespaces,
    })
}

impl Controller {
    /// This controller's statistics, for the blob.
    pub(super) fn encode_stats(&self, w: &mut W) {
        use ControllerStats as C;
        let s = &self.stats;
        for c in counters(s) {
            w.u64(C::get(c));
        }
        encode_io(w, &self.io_totals());
        w.u16(s.io_errors.len() as u16);
        for e in &s.io_errors {
            w.u64(C::get(e));
        }
        let n = self.namespaces.len().min(MAX_NAMESPACES);
        w.u16(n as u16);
        for ns in self.namespaces.iter().take(n) {
            w.u32(ns.nsid);
            encode_io(w, &ns.stats.snapshot());
        }
    }

    /// Count on from `saved` (a new worker restoring): the controller's counters and those
    /// of each namespace it has again.
    pub(super) fn carry_stats(&self, saved: &SavedStats) {
        let s = &self.stats;
        for (c, &v) in counters(s).into_iter().zip(&saved.counters) {
            c.fetch_add(v, std::sync::atomic::Ordering::Relaxed);
        }
        for (c, &v) in s.io_errors.iter().zip(&saved.io_errors) {
            c.fetch_add(v, std::sync::atomic::Ordering::Relaxed);
        }
        // the saved totals include the namespaces' counts: what a namespace here carries on
        // is not counted again among the others
        let mut others = saved.io;
        for (nsid, io) in &saved.namespaces {
            if let Some(ns) = self.namespaces.iter().find(|n| n.nsid == *nsid) {
                ns.stats.carry(io);
                others.saturating_sub(io);
            }
        }
        s.others.carry(&others);
    }

    /// [`ControllerStats::io`] as the controller's own thread (the only writer) sums it: from
    /// its namespaces at hand, without the readers' lock.
    fn io_totals(&self) -> IoSnapshot {
        let mut total = self.stats.others.snapshot();
        for ns in &self.namespaces {
            total.add(&ns.stats.snapshot());
        }
        total
    }

    /// Commands counted so far (I/O and admin): whether the statistics moved.
    fn commands_counted(&self) -> u64 {
        let io: u64 = self.namespaces.iter().map(|n| n.stats.commands()).sum();
        io + self.stats.others.commands() + ControllerStats::get(&self.stats.admin_commands)
    }

    /// True about once a second while the statistics move (checked every few thousand poll
    /// passes): time to save them.
    pub(super) fn stats_due(&mut self) -> bool {
        let c = &mut self.stats_save;
        c.countdown -= 1;
        if c.countdown > 0 {
            return false;
        }
        c.countdown = POLLS_PER_LOOK;
        let (counted, at) = (c.counted, c.at);
        self.commands_counted() != counted && at.elapsed() >= SAVE_EVERY
    }

    /// The statistics were saved now.
    pub(super) fn stats_saved(&mut self) {
        self.stats_save.counted = self.commands_counted();
        self.stats_save.at = Instant::now();
    }
}

/// The controller's own counters carried, in [`SavedStats::counters`] order.
fn counters(s: &ControllerStats) -> [&std::sync::atomic::AtomicU64; 6] {
    [
        &s.enables,
        &s.shadow_doorbell_configs,
        &s.async_events,
        &s.fatal,
        &s.admin_commands,
        &s.admin_errors,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Saved statistics of a build that knows `statuses` error statuses.
    fn saved(statuses: u16) -> Vec<u8> {
        let mut w = W::default();
        for c in 1..=6 {
            w.u64(c);
        }
        encode_io(&mut w, &IoSnapshot::default());
        w.u16(statuses);
        for i in 0..statuses {
            w.u64(u64::from(i) + 1);
        }
        w.u16(0);
        w.0
    }

    /// The saved totals include the namespaces' counts: carried on, a command is counted
    /// once, by its namespace when this controller has it again, among the others when not.
    #[test]
    fn carried_totals_count_each_command_once() {
        use crate::backend::NullBackend;
        let ns = crate::Namespace::new(1, Box::new(NullBackend::new(1 << 20)), 9, "S");
        let h = crate::test_harness::Harness::new(vec![ns]);
        let io = |reads| IoSnapshot {
            reads,
            ..IoSnapshot::default()
        };
        let saved = SavedStats {
            counters: [0; 6],
            io: io(10),
            io_errors: vec![0; ERROR_STATUSES.len()],
            namespaces: vec![(1, io(7)), (9, io(1))],
        };
        h.ctrl.carry_stats(&saved);
        let stats = h.ctrl.stats();
        assert_eq!(stats.io().reads, 10);
        assert_eq!(stats.namespaces()[0].1.snapshot().reads, 7);
        assert_eq!(
            stats.others.snapshot().reads,
            3,
            "namespace 9's and the rest"
        );
    }

    /// A later build with more error statuses, or an earlier one with fewer: the counts are
    /// kept (the extra ones as the catch-all), not the whole saved state dropped.
    #[test]
    fn another_number_of_error_statuses_is_carried() {
        let n = ERROR_STATUSES.len();
        let more = decode(&mut R(&saved(n as u16 + 2))).expect("more statuses");
        assert_eq!(more.io_errors.len(), n);
        assert_eq!(more.io_errors[0], 1);
        let tail: u64 = (n as u64..n as u64 + 3).sum();
        assert_eq!(
            more.io_errors[n - 1],
            tail,
            "the extra ones in the catch-all"
        );
        let fewer = decode(&mut R(&saved(3))).expect("fewer statuses");
        assert_eq!(fewer.io_errors[..4], [1, 2, 3, 0]);
        assert_eq!(fewer.counters, [1, 2, 3, 4, 5, 6]);
        assert!(decode(&mut R(&saved(MAX_ERROR_STATUSES as u16 + 1))).is_none());
    }
}
