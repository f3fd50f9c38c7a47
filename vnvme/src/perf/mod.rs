//! `vnvme perf`: spdk_nvme_perf's method over our host driver. Each worker thread owns one
//! I/O queue pair per namespace and keeps QD commands in flight on each, polling; latency
//! is measured per command from submission to completion (`histogram.rs`), and `--verify`
//! checks that what reads return is what this run wrote.

// statistics for display: counts far below 2^52, precision loss is moot
#![allow(clippy::cast_precision_loss)]

// perf's own buffers handed to a backend as guest buffers
#[allow(unsafe_code)]
pub mod backend_job;
pub use sys_util::clock;
pub mod histogram;
mod rng;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use host_driver::NvmeDriver;

pub use histogram::Histogram;
pub use rng::Rng;
use worker::Job;

/// Access pattern (`-w`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    Read,
    Write,
    Randread,
    Randwrite,
    Randrw,
}

impl Pattern {
    fn random(self) -> bool {
        matches!(
            self,
            Pattern::Randread | Pattern::Randwrite | Pattern::Randrw
        )
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct PerfOptions {
    /// Commands in flight per queue pair.
    pub queue_depth: u32,
    /// Bytes per I/O (a multiple of the block size).
    pub io_size: u64,
    pub pattern: Pattern,
    /// Reads in percent for `randrw`.
    pub read_percent: u8,
    pub duration: Duration,
    /// Worker threads (one queue pair per namespace each).
    pub workers: usize,
    pub verify: bool,
    /// Doorbell Buffer Config before the I/O queues are created.
    pub shadow_doorbells: bool,
}

/// Results of one (namespace, worker) pair.
#[derive(Clone, Debug)]
pub struct JobResult {
    pub nsid: u32,
    pub worker: usize,
    pub ios: u64,
    pub bytes: u64,
    pub errors: u64,
    /// Blocks read back and compared with what this run wrote (`--verify`).
    pub verified_blocks: u64,
    pub verify_failures: u64,
    /// Latency in clock ticks; multiply by [`Report::ns_per_tick`].
    pub latency: Histogram,
}

impl JobResult {
    /// Nothing counted yet for namespace `nsid`, worker `worker`.
    pub fn empty(nsid: u32, worker: usize) -> Self {
        Self {
            nsid,
            worker,
            ios: 0,
            bytes: 0,
            errors: 0,
            verified_blocks: 0,
            verify_failures: 0,
            latency: Histogram::default(),
        }
    }
}

/// A finished run.
#[derive(Clone, Debug)]
pub struct Report {
    pub elapsed: Duration,
    /// Nanoseconds per latency tick (see `sys_util::clock`).
    pub ns_per_tick: f64,
    pub jobs: Vec<JobResult>,
    /// The run checked what it read (`--verify`).
    pub verify: bool,
}

impl Report {
    /// All jobs merged.
    pub fn total(&self) -> JobResult {
        let mut t = JobResult::empty(0, 0);
        for j in &self.jobs {
            t.ios += j.ios;
            t.bytes += j.bytes;
            t.errors += j.errors;
            t.verified_blocks += j.verified_blocks;
            t.verify_failures += j.verify_failures;
            t.latency.merge(&j.latency);
        }
        t
    }
}

/// Perf errors.
#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Driver(#[from] host_driver::DriverError),
    #[error("worker {0} panicked")]
    Worker(usize),
}

/// Run `opts` against every namespace of `ctrl`; `progress(elapsed, ios_so_far)` is called
/// about once a second.
pub fn run(
    ctrl: &mut NvmeDriver,
    opts: &PerfOptions,
    mut progress: impl FnMut(Duration, u64),
) -> Result<Report, PerfError> {
    let namespaces = ctrl.namespaces().to_vec();
    if namespaces.is_empty() {
        return Err(PerfError::Invalid(
            "the controller has no active namespace".into(),
        ));
    }
    let max_qd = ctrl.max_queue_size().min(65536) - 1;
    if opts.queue_depth == 0 || opts.queue_depth > max_qd {
        return Err(PerfError::Invalid(format!(
            "queue depth {} outside 1..={max_qd} (CAP.MQES)",
            opts.queue_depth
        )));
    }
    if opts.io_size == 0 || opts.io_size > ctrl.max_transfer() {
        return Err(PerfError::Invalid(format!(
            "I/O size {} outside 1..={} (MDTS)",
            opts.io_size,
            ctrl.max_transfer()
        )));
    }
    let pairs = opts.workers * namespaces.len();
    if pairs > usize::from(ctrl.io_queue_count()) {
        return Err(PerfError::Invalid(format!(
            "{pairs} queue pairs wanted ({} workers x {} namespaces), the controller granted {}",
            opts.workers,
            namespaces.len(),
            ctrl.io_queue_count()
        )));
    }
    if opts.shadow_doorbells {
        ctrl.use_shadow_doorbells()?;
    }
    let qsize = u16::try_from(opts.queue_depth + 1).unwrap_or(u16::MAX);
    let mut per_worker: Vec<Vec<Job>> = (0..opts.workers).map(|_| Vec::new()).collect();
    for (w, jobs) in per_worker.iter_mut().enumerate() {
        for ns in &namespaces {
            if !opts.io_size.is_multiple_of(u64::from(ns.block_size)) {
                return Err(PerfError::Invalid(format!(
                    "I/O size {} is not a multiple of namespace {}'s {}-byte blocks",
                    opts.io_size, ns.nsid, ns.block_size
                )));
            }
            let qp = ctrl.create_io_queue_pair(qsize)?;
            jobs.push(Job::new(qp, ns, w, opts, ctrl.dma())?);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done_ios = Arc::new(AtomicU64::new(0));
    let calibration = clock::Calibration::start();
    let start = Instant::now();
    let mut handles = Vec::new();
    for (w, jobs) in per_worker.into_iter().enumerate() {
        let stop = Arc::clone(&stop);
        let done = Arc::clone(&done_ios);
        let opts = opts.clone();
        let h = std::thread::Builder::new()
            .name(format!("perf-{w}"))
            .spawn(move || worker::run(jobs, &opts, &stop, &done))
            .map_err(|e| PerfError::Invalid(format!("spawn worker: {e}")))?;
        handles.push(h);
    }
    let mut health = Ok(());
    while start.elapsed() < opts.duration {
        let left = opts.duration.saturating_sub(start.elapsed());
        std::thread::sleep(left.min(Duration::from_secs(1)));
        progress(start.elapsed(), done_ios.load(Ordering::Relaxed));
        health = ctrl.check_health();
        if health.is_err() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let mut report = Report {
        elapsed,
        ns_per_tick: 1.0,
        jobs: Vec::new(),
        verify: opts.verify,
    };
    let mut qps = Vec::new();
    for (w, h) in handles.into_iter().enumerate() {
        let (results, pairs) = h.join().map_err(|_| PerfError::Worker(w))?;
        report.jobs.extend(results);
        qps.extend(pairs);
    }
    report.ns_per_tick = calibration.finish();
    health?;
    for qp in qps {
        ctrl.delete_io_queue_pair(qp)?;
    }
    Ok(report)
}

/// Format a report the way spdk_nvme_perf does (latency in microseconds), then the latency
/// percentiles per namespace and in total.
pub fn format_report(target: &str, r: &Report) -> String {
    use std::fmt::Write;
    let secs = r.elapsed.as_secs_f64();
    let us = r.ns_per_tick / 1000.0;
    let names: Vec<String> = r
        .jobs
        .iter()
        .map(|j| format!("{target} NSID {} from worker {}", j.nsid, j.worker))
        .collect();
    let w = names.iter().map(String::len).max().unwrap_or(0).max(20);
    let total = r.total();
    let rows: Vec<(&str, &JobResult)> = names
        .iter()
        .map(String::as_str)
        .zip(r.jobs.iter())
        .chain([("Total", &total)])
        .collect();
    let mut out = String::new();
    let rule = "=".repeat(w + 58);
    let _ = writeln!(out, "{rule}");
    let _ = writeln!(
        out,
        "{:<w$}  {:>12} {:>10} {:>32}",
        "", "", "", "Latency(us)"
    );
    let _ = writeln!(
        out,
        "{:<w$}: {:>12} {:>10} {:>10} {:>10} {:>10}",
        "Device Information", "IOPS", "MiB/s", "Average", "min", "max"
    );
    for (i, (name, j)) in rows.iter().enumerate() {
        if i == rows.len() - 1 {
            let _ = writeln!(out, "{rule}");
        }
        let (min, max) = j.latency.min_max();
        let _ = writeln!(
            out,
            "{name:<w$}: {:>12.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
            j.ios as f64 / secs,
            j.bytes as f64 / secs / f64::from(1 << 20),
            j.latency.mean() * us,
            min as f64 * us,
            max as f64 * us
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<w$}: {:>10} {:>10} {:>10} {:>10} {:>10}",
        "Latency percentiles (us)", "p50", "p90", "p99", "p99.9", "p99.99"
    );
    for (name, j) in &rows {
        let p = |q| j.latency.percentile(q) as f64 * us;
        let _ = writeln!(
            out,
            "{name:<w$}: {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
            p(50.0),
            p(90.0),
            p(99.0),
            p(99.9),
            p(99.99)
        );
    }
    if r.verify {
        let _ = writeln!(
            out,
            "verified {} blocks, {} mismatches",
            total.verified_blocks, total.verify_failures
        );
    }
    if total.errors > 0 || total.verify_failures > 0 {
        let _ = writeln!(
            out,
            "errors: {} commands failed, {} blocks failed verification",
            total.errors, total.verify_failures
        );
    }
    out
}
