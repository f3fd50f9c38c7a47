//! What a controller counts for the control plane (daemon status, `vnvme rpc stats`, the
//! Prometheus endpoint), readable without a message to the reactor.
//!
//! - [`ControllerStats`]: rare events (enables, async events, fatal status) and, per command,
//!   the I/O totals, errors by status, admin commands and the queue depth;
//! - [`IoStats`]: commands, bytes, errors and a latency histogram, once for the controller
//!   and once per attached namespace (each namespace's lives with its [`crate::Namespace`]
//!   and is listed in [`ControllerStats::namespaces`] while attached).
//!
//! Cost on the data path: the reactor thread owning the controller is the only writer, so a
//! counter is bumped with a relaxed load and a relaxed store (two plain moves on x86, no
//! lock-prefixed read-modify-write); a reader sees each counter whole, the counters of one
//! command perhaps not all at once. Latency is taken with the CPU's time-stamp counter at SQE
//! fetch and at CQE post ([`sys_util::clock`]) and kept in nanoseconds in log2 buckets.

#![allow(clippy::cast_precision_loss)] // quantiles are estimates

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use nvme_spec::Status;
use nvme_spec::opcode::nvm;
use nvme_spec::status::sct;

/// `counter += n` for a counter with one writer (relaxed load + store: no atomic RMW).
#[inline]
fn add(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// log2 of the first bucket's upper bound in nanoseconds (256 ns).
pub const LATENCY_FIRST_SHIFT: u32 = 8;
/// Finite latency buckets: bucket `i` counts latencies <= 2^(8+i) ns, up to 2^35 ns (34 s);
/// one more counts the rest (+Inf).
pub const LATENCY_BUCKETS: usize = 28;

/// Bucket of a latency of `ns` nanoseconds.
#[inline]
pub fn latency_bucket(ns: u64) -> usize {
    // ceil(log2(ns)): bucket i holds (2^(7+i), 2^(8+i)]
    let log2_ceil = 64 - ns.saturating_sub(1).leading_zeros();
    (log2_ceil.saturating_sub(LATENCY_FIRST_SHIFT) as usize).min(LATENCY_BUCKETS)
}

/// Upper bound of bucket `i` in nanoseconds (`None`: the +Inf bucket).
pub fn latency_bucket_bound_ns(i: usize) -> Option<u64> {
    (i < LATENCY_BUCKETS).then(|| 1u64 << (LATENCY_FIRST_SHIFT as usize + i))
}

/// A latency histogram in fixed log2 buckets of nanoseconds.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS + 1],
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// Count one latency (single writer).
    #[inline]
    pub fn record(&self, ns: u64) {
        add(&self.buckets[latency_bucket(ns)], 1);
        add(&self.sum_ns, ns);
    }

    /// The counts as they are now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's counts at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Per bucket (not cumulative); the last is +Inf.
    pub buckets: [u64; LATENCY_BUCKETS + 1],
    /// Sum of the latencies counted, in nanoseconds.
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    /// Latencies counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The `q`-quantile (0..=1) in nanoseconds, interpolated linearly inside its bucket (the
    /// +Inf bucket answers its lower bound); 0 when nothing was counted.
    pub fn quantile_ns(&self, q: f64) -> f64 {
        let count = self.count();
        if count == 0 {
            return 0.0;
        }
        let rank = (q.clamp(0.0, 1.0) * count as f64).max(1.0);
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let lower = if i == 0 {
                0.0
            } else {
                (1u64 << (LATENCY_FIRST_SHIFT as usize + i - 1)) as f64
            };
            let Some(upper) = latency_bucket_bound_ns(i) else {
                return lower;
            };
            if (seen + n) as f64 >= rank {
                let within = (rank - seen as f64) / n as f64;
                return lower + within * (upper as f64 - lower);
            }
            seen += n;
        }
        0.0
    }

    /// Mean latency in nanoseconds; 0 when nothing was counted.
    pub fn mean_ns(&self) -> f64 {
        match self.count() {
            0 => 0.0,
            n => self.sum_ns as f64 / n as f64,
        }
    }
}

/// Command counters of a controller's I/O queues, or of one namespace.
#[derive(Debug, Default)]
pub struct IoStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    /// Every other I/O command (Flush, Write Zeroes, Dataset Management, Compare...).
    pub other: AtomicU64,
    /// Data bytes of successful Reads and Writes.
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    /// Commands completed with an error status.
    pub errors: AtomicU64,
    /// From SQE fetch to CQE post.
    pub latency: LatencyHistogram,
}

impl IoStats {
    /// Count one completed command (single writer).
    #[inline]
    pub fn record(&self, opcode: u8, bytes: u64, status: Status, ns: u64) {
        let ok = status.is_success();
        match opcode {
            nvm::READ => {
                add(&self.reads, 1);
                if ok {
                    add(&self.read_bytes, bytes);
                }
            }
            nvm::WRITE => {
                add(&self.writes, 1);
                if ok {
                    add(&self.written_bytes, bytes);
                }
            }
            _ => add(&self.other, 1),
        }
        if !ok {
            add(&self.errors, 1);
        }
        self.latency.record(ns);
    }

    /// Commands counted (reads, writes and the others).
    pub fn commands(&self) -> u64 {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        get(&self.reads) + get(&self.writes) + get(&self.other)
    }

    /// The counters as they are now.
    pub fn snapshot(&self) -> IoSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IoSnapshot {
            reads: get(&self.reads),
            writes: get(&self.writes),
            other: get(&self.other),
            read_bytes: get(&self.read_bytes),
            written_bytes: get(&self.written_bytes),
            errors: get(&self.errors),
            latency: self.latency.snapshot(),
        }
    }
}

impl IoStats {
    /// Count `s` in as well: the counters an earlier worker saved (single writer, before
    /// this one counts anything of its own).
    pub(crate) fn carry(&self, s: &IoSnapshot) {
        add(&self.reads, s.reads);
        add(&self.writes, s.writes);
        add(&self.other, s.other);
        add(&self.read_bytes, s.read_bytes);
        add(&self.written_bytes, s.written_bytes);
        add(&self.errors, s.errors);
        for (b, &n) in self.latency.buckets.iter().zip(&s.latency.buckets) {
            add(b, n);
        }
        add(&self.latency.sum_ns, s.latency.sum_ns);
    }
}

/// [`IoStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub other: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub errors: u64,
    pub latency: HistogramSnapshot,
}

impl IoSnapshot {
    /// Commands counted.
    pub fn commands(&self) -> u64 {
        self.reads + self.writes + self.other
    }

    /// Count `o` in as well.
    pub fn add(&mut self, o: &IoSnapshot) {
        self.combine(o, u64::wrapping_add);
    }

    /// Take `o` out (each counter at least 0).
    pub fn saturating_sub(&mut self, o: &IoSnapshot) {
        self.combine(o, u64::saturating_sub);
    }

    fn combine(&mut self, o: &IoSnapshot, f: fn(u64, u64) -> u64) {
        for (a, b) in [
            (&mut self.reads, o.reads),
            (&mut self.writes, o.writes),
            (&mut self.other, o.other),
            (&mut self.read_bytes, o.read_bytes),
            (&mut self.written_bytes, o.written_bytes),
            (&mut self.errors, o.errors),
            (&mut self.latency.sum_ns, o.latency.sum_ns),
        ] {
            *a = f(*a, b);
        }
        for (a, &b) in self.latency.buckets.iter_mut().zip(&o.latency.buckets) {
            *a = f(*a, b);
        }
    }
}

/// The statuses I/O errors are counted by: a fixed table (bounded whatever a guest sends),
/// each a name and the (SCT, SC) pairs it covers; the last, "other", takes the rest.
pub const ERROR_STATUSES: [(&str, &[(u8, u8)]); 14] = [
    ("invalid_opcode", &[(sct::GENERIC, 0x01)]),
    ("invalid_field", &[(sct::GENERIC, 0x02)]),
    ("data_transfer_error", &[(sct::GENERIC, 0x04)]),
    ("internal_error", &[(sct::GENERIC, 0x06)]),
    (
        "aborted",
        &[
            (sct::GENERIC, 0x07),
            (sct::GENERIC, 0x08),
            (sct::PATH, 0x71),
        ],
    ),
    ("invalid_namespace", &[(sct::GENERIC, 0x0b)]),
    (
        "invalid_data_pointer",
        &[
            (sct::GENERIC, 0x0d),
            (sct::GENERIC, 0x0e),
            (sct::GENERIC, 0x0f),
            (sct::GENERIC, 0x11),
            (sct::GENERIC, 0x13),
            (sct::GENERIC, 0x16),
        ],
    ),
    ("transient_transport_error", &[(sct::GENERIC, 0x22)]),
    ("lba_out_of_range", &[(sct::GENERIC, 0x80)]),
    ("write_fault", &[(sct::MEDIA, 0x80)]),
    ("unrecovered_read_error", &[(sct::MEDIA, 0x81)]),
    ("compare_failure", &[(sct::MEDIA, 0x85)]),
    ("path_error", &[(sct::PATH, 0x00), (sct::PATH, 0x70)]),
    ("other", &[]),
];

/// Index in [`ERROR_STATUSES`] of a failed command's status.
pub fn error_status_index(s: Status) -> usize {
    let key = (s.sct(), s.sc());
    ERROR_STATUSES
        .iter()
        .position(|(_, codes)| codes.contains(&key))
        .unwrap_or(ERROR_STATUSES.len() - 1)
}

/// Counters of one controller since the daemon started.
#[derive(Debug, Default)]
pub struct ControllerStats {
    /// Controller enables (CC.EN 0 -> 1 that brought the controller ready).
    pub enables: AtomicU64,
    /// Successful Doorbell Buffer Config commands.
    pub shadow_doorbell_configs: AtomicU64,
    /// Asynchronous events raised.
    pub async_events: AtomicU64,
    /// Times the controller entered Controller Fatal Status.
    pub fatal: AtomicU64,
    /// CSTS.RDY as of the last enable or reset.
    pub ready: AtomicBool,
    /// Commands of the I/O queues on no attached namespace (an NSID not attached, a Flush of
    /// every namespace), and those counted by namespaces since detached. The controller's
    /// totals are these plus the attached namespaces' ([`ControllerStats::io`]): a command
    /// is counted once, by its namespace.
    pub others: IoStats,
    /// I/O commands failed, by [`ERROR_STATUSES`].
    pub io_errors: [AtomicU64; ERROR_STATUSES.len()],
    /// Admin commands completed, and those that failed.
    pub admin_commands: AtomicU64,
    pub admin_errors: AtomicU64,
    /// I/O commands in flight (fetched, not yet completed), published once per poll pass.
    pub in_flight: AtomicU64,
    /// The I/O counters of each attached namespace, by NSID (changed on attach and detach
    /// only, never per command).
    namespaces: Mutex<Vec<(u32, Arc<IoStats>)>>,
}

impl ControllerStats {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Read a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Count one failed command of the I/O queues by its status (single writer); its
    /// namespace's counters, or [`ControllerStats::others`], count the command itself.
    #[cold]
    pub(crate) fn record_io_error(&self, status: Status) {
        add(&self.io_errors[error_status_index(status)], 1);
    }

    /// Commands of the I/O queues: the attached namespaces' counters plus
    /// [`ControllerStats::others`].
    pub fn io(&self) -> IoSnapshot {
        let list = self
            .namespaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut total = self.others.snapshot();
        for (_, ns) in list.iter() {
            total.add(&ns.snapshot());
        }
        total
    }

    /// Count one completed admin command (single writer).
    #[inline]
    pub(crate) fn record_admin(&self, status: Status) {
        add(&self.admin_commands, 1);
        if !status.is_success() {
            add(&self.admin_errors, 1);
        }
    }

    /// I/O errors by status name, every name of [`ERROR_STATUSES`] in order.
    pub fn io_errors(&self) -> [(&'static str, u64); ERROR_STATUSES.len()] {
        std::array::from_fn(|i| (ERROR_STATUSES[i].0, Self::get(&self.io_errors[i])))
    }

    /// The attached namespaces' counters, by NSID ascending.
    pub fn namespaces(&self) -> Vec<(u32, Arc<IoStats>)> {
        self.namespaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// List the counters of the namespaces attached now (attach, detach). The counts of a
    /// namespace no longer listed move to [`ControllerStats::others`] (single writer: the
    /// controller's thread, which no longer counts on it), under the lock readers take, so
    /// the totals never see them twice or not at all.
    pub(crate) fn set_namespaces(&self, list: impl Iterator<Item = (u32, Arc<IoStats>)>) {
        let mut v = self
            .namespaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let old = std::mem::take(&mut *v);
        v.extend(list);
        for (_, gone) in old {
            if !v.iter().any(|(_, s)| Arc::ptr_eq(s, &gone)) {
                self.others.carry(&gone.snapshot());
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // exact bucket bounds
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_of_nanoseconds() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1), 0);
        assert_eq!(latency_bucket(256), 0);
        assert_eq!(latency_bucket(257), 1);
        assert_eq!(latency_bucket(512), 1);
        assert_eq!(latency_bucket(1000), 2); // <= 1024
        assert_eq!(latency_bucket(1025), 3);
        assert_eq!(latency_bucket(1 << 35), LATENCY_BUCKETS - 1);
        assert_eq!(latency_bucket((1 << 35) + 1), LATENCY_BUCKETS);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS);
        for i in 0..LATENCY_BUCKETS {
            let b = latency_bucket_bound_ns(i).unwrap();
            assert_eq!(latency_bucket(b), i, "bound of {i} is in it");
            assert_eq!(latency_bucket(b + 1), i + 1, "one past it is not");
        }
        assert_eq!(latency_bucket_bound_ns(LATENCY_BUCKETS), None);
    }

    #[test]
    fn histogram_counts_sums_and_quantiles() {
        let h = LatencyHistogram::default();
        assert_eq!(h.snapshot().quantile_ns(0.5), 0.0);
        // 90 of 3 us (bucket (2048, 4096]), 9 of 100 us, one of a minute (+Inf)
        for _ in 0..90 {
            h.record(3_000);
        }
        for _ in 0..9 {
            h.record(100_000);
        }
        h.record(60_000_000_000);
        let s = h.snapshot();
        assert_eq!(s.count(), 100);
        assert_eq!(s.sum_ns, 90 * 3_000 + 9 * 100_000 + 60_000_000_000);
        assert_eq!(s.buckets[latency_bucket(3_000)], 90);
        assert_eq!(s.buckets[LATENCY_BUCKETS], 1);
        let p50 = s.quantile_ns(0.5);
        assert!((2048.0..=4096.0).contains(&p50), "{p50}");
        let p99 = s.quantile_ns(0.99);
        assert!((65_536.0..=131_072.0).contains(&p99), "{p99}");
        assert_eq!(s.quantile_ns(0.999), (1u64 << 35) as f64);
        assert_eq!(s.quantile_ns(1.0), (1u64 << 35) as f64);
        assert!(s.quantile_ns(0.0) > 2048.0);
        assert!((s.mean_ns() - s.sum_ns as f64 / 100.0).abs() < 1e-6);
    }

    #[test]
    fn io_counts_by_opcode_bytes_on_success_errors_by_status() {
        let c = ControllerStats::default();
        let record = |opcode, bytes, status: Status, ns| {
            c.others.record(opcode, bytes, status, ns);
            if !status.is_success() {
                c.record_io_error(status);
            }
        };
        record(nvm::READ, 4096, Status::SUCCESS, 5_000);
        record(nvm::WRITE, 8192, Status::SUCCESS, 5_000);
        record(nvm::READ, 4096, Status::UNRECOVERED_READ_ERROR, 5_000);
        record(nvm::FLUSH, 0, Status::INVALID_NAMESPACE, 1_000);
        record(nvm::WRITE, 4096, Status::new(sct::GENERIC, 0x7f), 1_000);
        c.record_admin(Status::SUCCESS);
        c.record_admin(Status::INVALID_FIELD);
        let s = c.io();
        assert_eq!((s.reads, s.writes, s.other, s.errors), (2, 2, 1, 3));
        assert_eq!((s.read_bytes, s.written_bytes), (4096, 8192));
        assert_eq!(s.latency.count(), s.commands());
        let by: std::collections::HashMap<_, _> = c.io_errors().into_iter().collect();
        assert_eq!(by["unrecovered_read_error"], 1);
        assert_eq!(by["invalid_namespace"], 1);
        assert_eq!(by["other"], 1);
        assert_eq!(by.values().sum::<u64>(), 3);
        assert_eq!(ControllerStats::get(&c.admin_commands), 2);
        assert_eq!(ControllerStats::get(&c.admin_errors), 1);
        assert_eq!(error_status_index(Status::INVALID_SGL_TYPE), 6);
        assert_eq!(error_status_index(Status::HOST_ABORTED), 4);
    }

    /// A controller counts what it completes: reads and writes with their bytes on the
    /// controller and the namespace, a command for no namespace on the controller only,
    /// errors by status, admin commands, latency for each I/O command.
    #[test]
    fn a_controller_counts_its_commands() {
        use crate::backend::MallocBackend;
        use crate::test_harness::{DATA, Harness, sqe};
        let ns = crate::Namespace::new(1, Box::new(MallocBackend::new(1 << 20).unwrap()), 9, "S");
        let mut h = Harness::new(vec![ns]);
        let stats = h.ctrl.stats();
        let admin_before = ControllerStats::get(&stats.admin_commands);
        assert!(admin_before >= 2, "the harness created a queue pair");
        // 8 blocks of 512 bytes written, then read twice
        assert_eq!(
            h.io_run(sqe(nvm::WRITE, 1, DATA, &[0, 0, 7])),
            Status::SUCCESS
        );
        for _ in 0..2 {
            assert_eq!(
                h.io_run(sqe(nvm::READ, 1, DATA, &[0, 0, 7])),
                Status::SUCCESS
            );
        }
        // past the end, a namespace that is not there, an unknown admin opcode
        let lba_past = sqe(nvm::READ, 1, DATA, &[4096, 0, 0]);
        assert_eq!(h.io_run(lba_past), Status::LBA_OUT_OF_RANGE);
        assert_eq!(
            h.io_run(sqe(nvm::FLUSH, 7, 0, &[])),
            Status::INVALID_NAMESPACE
        );
        let bad = h.admin(sqe(0x7e, 0, 0, &[]));
        assert_eq!(h.admin_wait(bad), Status::INVALID_OPCODE);

        let c = stats.io();
        assert_eq!((c.reads, c.writes, c.other, c.errors), (3, 1, 1, 2));
        assert_eq!((c.read_bytes, c.written_bytes), (8192, 4096));
        assert_eq!(c.latency.count(), 5);
        assert!(c.latency.sum_ns > 0);
        let by: std::collections::HashMap<_, _> = stats.io_errors().into_iter().collect();
        assert_eq!(by["lba_out_of_range"], 1);
        assert_eq!(by["invalid_namespace"], 1);
        assert_eq!(
            ControllerStats::get(&stats.admin_commands),
            admin_before + 1
        );
        assert_eq!(ControllerStats::get(&stats.admin_errors), 1);
        assert_eq!(ControllerStats::get(&stats.in_flight), 0);

        let list = stats.namespaces();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].0, 1);
        let n = list[0].1.snapshot();
        assert_eq!((n.reads, n.writes, n.other, n.errors), (3, 1, 0, 1));
        assert_eq!((n.read_bytes, n.written_bytes), (8192, 4096));
        assert_eq!(n.latency.count(), 4);

        // a detached namespace is no longer listed; the controller's totals keep its counts
        h.ctrl.apply(crate::NamespaceChange::Detach(1));
        assert!(stats.namespaces().is_empty());
        assert_eq!(stats.io(), c);
        assert_eq!(stats.others.snapshot(), c);
    }

    /// What counting adds per I/O command: two clock reads, the conversion to nanoseconds
    /// and the namespace's counters (BENCHMARKS.md). Run with
    /// `cargo test --release -p device-model stats::tests::cost_per_command -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn cost_per_command() {
        let ns = IoStats::default();
        let rate = sys_util::clock::rate();
        let n = 20_000_000u64;
        let t = std::time::Instant::now();
        for i in 0..n {
            let fetched = sys_util::clock::ticks();
            let op = if i & 1 == 0 { nvm::READ } else { nvm::WRITE };
            let lat = rate.ns(sys_util::clock::ticks().saturating_sub(fetched));
            ns.record(op, 4096, Status::SUCCESS, lat);
        }
        let per = t.elapsed().as_nanos() as f64 / n as f64;
        assert_eq!(ns.snapshot().commands(), n);
        let t = std::time::Instant::now();
        let mut acc = 0u64;
        for _ in 0..n {
            let fetched = sys_util::clock::ticks();
            acc = acc.wrapping_add(sys_util::clock::ticks().wrapping_sub(fetched));
        }
        let clock = t.elapsed().as_nanos() as f64 / n as f64;
        std::hint::black_box(acc);
        eprintln!("counting one command: {per:.1} ns, of which the two clock reads {clock:.1} ns");
    }
}
