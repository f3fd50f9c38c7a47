//! One perf worker: its queue pairs (one per namespace), QD buffers each, the submit /
//! poll / resubmit loop, and the verify bookkeeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use host_driver::{DmaBuffer, DmaMemory, DriverError, IoQueuePair, NamespaceInfo};

use super::rng::Rng;
use super::{JobResult, Pattern, PerfOptions, clock};

/// A command in flight: when, where, which direction.
#[derive(Clone, Copy)]
struct Inflight {
    /// Submission time in [`clock::ticks`].
    start: u64,
    unit: u64,
    write: bool,
}

/// One queue pair on one namespace.
pub(super) struct Job {
    qp: IoQueuePair,
    nsid: u32,
    block_size: u64,
    blocks_per_io: u32,
    /// I/O units (io_size each) this job may touch: [first, first + count).
    first_unit: u64,
    units: u64,
    next_seq: u64,
    buffers: Vec<DmaBuffer>,
    inflight: Vec<Option<Inflight>>,
    /// Verify: which units this run wrote.
    written: Vec<u64>,
    rng: Rng,
    result: JobResult,
    /// Bad reads seen so far (the first few are logged).
    shown_mismatches: u64,
}

/// Mismatching reads logged per job; later ones are only counted.
const MISMATCHES_SHOWN: u64 = 5;

impl Job {
    pub(super) fn new(
        qp: IoQueuePair,
        ns: &NamespaceInfo,
        worker: usize,
        opts: &PerfOptions,
        dma: &Arc<DmaMemory>,
    ) -> Result<Self, DriverError> {
        let block_size = u64::from(ns.block_size);
        let blocks_per_io = (opts.io_size / block_size) as u32;
        let all_units = ns.blocks / u64::from(blocks_per_io);
        // workers split the namespace so that --verify never races two workers on a block
        let units = (all_units / opts.workers as u64).max(1);
        let first_unit = (units * worker as u64).min(all_units.saturating_sub(1));
        let mut buffers = Vec::with_capacity(opts.queue_depth as usize);
        for _ in 0..opts.queue_depth {
            buffers.push(dma.alloc(opts.io_size)?);
        }
        Ok(Self {
            qp,
            nsid: ns.nsid,
            block_size,
            blocks_per_io,
            first_unit,
            units,
            next_seq: 0,
            buffers,
            inflight: vec![None; opts.queue_depth as usize],
            written: if opts.verify {
                vec![0; units.div_ceil(64) as usize]
            } else {
                Vec::new()
            },
            rng: Rng(0x9e37_79b9_7f4a_7c15 ^ (u64::from(ns.nsid) << 32) ^ worker as u64),
            result: JobResult::empty(ns.nsid, worker),
            shown_mismatches: 0,
        })
    }

    fn pick_unit(&mut self, opts: &PerfOptions) -> u64 {
        loop {
            let u = if opts.pattern.random() {
                self.rng.next() % self.units
            } else {
                let u = self.next_seq % self.units;
                self.next_seq += 1;
                u
            };
            // with --verify, never two commands on one unit at once
            if !opts.verify || !self.inflight.iter().flatten().any(|f| f.unit == u) {
                return u;
            }
        }
    }

    fn is_write(&mut self, opts: &PerfOptions) -> bool {
        match opts.pattern {
            Pattern::Read | Pattern::Randread => false,
            Pattern::Write | Pattern::Randwrite => true,
            Pattern::Randrw => (self.rng.next() % 100) as u8 >= opts.read_percent,
        }
    }

    /// Fill a write buffer: every block starts with its LBA and namespace id, the rest is a
    /// pattern of both, so a misplaced or stale block is detected.
    fn fill(buf: &mut [u8], first_lba: u64, nsid: u32, block_size: u64) {
        for (i, block) in buf.chunks_mut(block_size as usize).enumerate() {
            let lba = first_lba + i as u64;
            block[..8].copy_from_slice(&lba.to_le_bytes());
            block[8..12].copy_from_slice(&nsid.to_le_bytes());
            for (j, b) in block[12..].iter_mut().enumerate() {
                *b = (lba as u8).wrapping_add(j as u8) ^ (nsid as u8);
            }
        }
    }

    fn check(buf: &[u8], first_lba: u64, nsid: u32, block_size: u64) -> u64 {
        let mut bad = 0;
        for (i, block) in buf.chunks(block_size as usize).enumerate() {
            let lba = first_lba + i as u64;
            let ok = block[..8] == lba.to_le_bytes()
                && block[8..12] == nsid.to_le_bytes()
                && block[12..]
                    .iter()
                    .enumerate()
                    .all(|(j, &b)| b == (lba as u8).wrapping_add(j as u8) ^ (nsid as u8));
            if !ok {
                bad += 1;
            }
        }
        bad
    }

    fn submit(&mut self, slot: usize, opts: &PerfOptions) -> Result<(), DriverError> {
        let unit = self.pick_unit(opts);
        let write = self.is_write(opts);
        let lba = (self.first_unit + unit) * u64::from(self.blocks_per_io);
        let buf = &mut self.buffers[slot];
        if write && opts.verify {
            Self::fill(
                &mut buf.as_mut_slice()[..opts.io_size as usize],
                lba,
                self.nsid,
                self.block_size,
            );
        }
        let (iova, len) = (buf.iova(), opts.io_size);
        self.inflight[slot] = Some(Inflight {
            start: clock::ticks(),
            unit,
            write,
        });
        self.qp.read_write(
            write,
            self.nsid,
            lba,
            self.blocks_per_io,
            iova,
            len,
            slot as u64,
        )?;
        Ok(())
    }

    fn complete(&mut self, slot: usize, ok: bool, opts: &PerfOptions) {
        let Some(f) = self.inflight[slot].take() else {
            return;
        };
        self.result
            .latency
            .record(clock::ticks().wrapping_sub(f.start));
        if !ok {
            self.result.errors += 1;
            return;
        }
        self.result.ios += 1;
        self.result.bytes += opts.io_size;
        if opts.verify {
            let (w, bit) = ((f.unit / 64) as usize, 1u64 << (f.unit % 64));
            if f.write {
                self.written[w] |= bit;
            } else if self.written[w] & bit != 0 {
                self.check_read(slot, f.unit, opts);
            }
        }
    }

    /// Check what the read of `unit` into `slot`'s buffer returned against what this run
    /// wrote there, and count it.
    fn check_read(&mut self, slot: usize, unit: u64, opts: &PerfOptions) {
        let lba = (self.first_unit + unit) * u64::from(self.blocks_per_io);
        let bad = Self::check(
            &self.buffers[slot].as_slice()[..opts.io_size as usize],
            lba,
            self.nsid,
            self.block_size,
        );
        self.record_check(lba, bad);
    }

    /// Count one checked read of `blocks_per_io` blocks at `lba` with `bad` mismatches; the
    /// first [`MISMATCHES_SHOWN`] bad reads are logged.
    fn record_check(&mut self, lba: u64, bad: u64) {
        self.result.verified_blocks += u64::from(self.blocks_per_io);
        if bad == 0 {
            return;
        }
        self.result.verify_failures += bad;
        self.shown_mismatches += 1;
        if self.shown_mismatches <= MISMATCHES_SHOWN {
            log::error!(
                "namespace {} LBA {lba}: {bad} blocks differ from what was written",
                self.nsid
            );
        }
        if self.shown_mismatches == MISMATCHES_SHOWN {
            log::error!(
                "namespace {}: further mismatches are counted, not shown",
                self.nsid
            );
        }
    }

    /// fio's verify after write, for patterns that only write: read back every unit this
    /// run wrote, QD at a time, and check it. Returns false when reads failed or hung.
    fn read_back(&mut self, opts: &PerfOptions) -> bool {
        let units: Vec<u64> = (0..self.units)
            .filter(|u| self.written[(u / 64) as usize] & (1u64 << (u % 64)) != 0)
            .collect();
        let qd = opts.queue_depth as usize;
        let mut slots: Vec<Option<u64>> = vec![None; qd];
        let mut next = 0;
        let mut finished: Vec<(usize, bool)> = Vec::with_capacity(qd);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for (slot, s) in slots.iter_mut().enumerate() {
                if s.is_none() && next < units.len() {
                    let unit = units[next];
                    next += 1;
                    let lba = (self.first_unit + unit) * u64::from(self.blocks_per_io);
                    let buf = &self.buffers[slot];
                    let r = self.qp.read_write(
                        false,
                        self.nsid,
                        lba,
                        self.blocks_per_io,
                        buf.iova(),
                        opts.io_size,
                        slot as u64,
                    );
                    match r {
                        Ok(_) => *s = Some(unit),
                        Err(e) => {
                            log::error!("namespace {}: read back: {e}", self.nsid);
                            self.result.errors += 1;
                        }
                    }
                }
            }
            self.qp.ring();
            if slots.iter().all(Option::is_none) {
                return true;
            }
            if Instant::now() > deadline {
                log::error!("namespace {}: read back did not finish in 30 s", self.nsid);
                self.result.errors += self.qp.outstanding() as u64;
                return false;
            }
            finished.clear();
            self.qp.poll(qd, |r| {
                finished.push((r.user as usize, r.status.is_success()));
            });
            for &(slot, ok) in &finished {
                let Some(unit) = slots[slot].take() else {
                    continue;
                };
                if !ok {
                    self.result.errors += 1;
                    continue;
                }
                self.check_read(slot, unit, opts);
            }
        }
    }
}

/// The worker loop; returns its results and queue pairs (for deletion by the caller).
pub(super) fn run(
    mut jobs: Vec<Job>,
    opts: &PerfOptions,
    stop: &AtomicBool,
    done: &AtomicU64,
) -> (Vec<JobResult>, Vec<IoQueuePair>) {
    let mut finished: Vec<(usize, bool)> = Vec::with_capacity(opts.queue_depth as usize);
    for job in &mut jobs {
        for slot in 0..opts.queue_depth as usize {
            if let Err(e) = job.submit(slot, opts) {
                log::error!("namespace {}: submit: {e}", job.nsid);
                job.result.errors += 1;
            }
        }
        job.qp.ring();
    }
    let mut iter: u32 = 0;
    let mut unreported = 0u64;
    let mut stopping = false;
    let mut drain_deadline = None;
    loop {
        let mut outstanding = 0;
        for job in &mut jobs {
            finished.clear();
            job.qp.poll(opts.queue_depth as usize, |r| {
                finished.push((r.user as usize, r.status.is_success()));
            });
            for &(slot, ok) in &finished {
                job.complete(slot, ok, opts);
                unreported += 1;
                if !stopping && let Err(e) = job.submit(slot, opts) {
                    log::error!("namespace {}: submit: {e}", job.nsid);
                    job.result.errors += 1;
                }
            }
            job.qp.ring();
            outstanding += job.qp.outstanding();
        }
        iter = iter.wrapping_add(1);
        if iter.is_multiple_of(256) {
            done.fetch_add(unreported, Ordering::Relaxed);
            unreported = 0;
            if !stopping && stop.load(Ordering::Relaxed) {
                stopping = true;
                drain_deadline = Some(Instant::now() + Duration::from_secs(10));
            }
        }
        if stopping {
            if outstanding == 0 {
                break;
            }
            if drain_deadline.is_some_and(|d| Instant::now() > d) {
                log::error!("worker: {outstanding} commands never completed (10 s)");
                for job in &mut jobs {
                    job.result.errors += job.qp.outstanding() as u64;
                }
                break;
            }
        }
    }
    done.fetch_add(unreported, Ordering::Relaxed);
    let writes_only = matches!(opts.pattern, Pattern::Write | Pattern::Randwrite);
    if opts.verify && writes_only {
        for job in &mut jobs {
            if job.qp.outstanding() == 0 {
                job.read_back(opts);
            }
        }
    }
    let mut results = Vec::new();
    let mut qps = Vec::new();
    for mut job in jobs {
        // a completion the device posted twice (or for an earlier use of its command id) is
        // an error of the device's, even though no command failed
        job.result.errors += job.qp.stale_completions();
        results.push(job.result);
        qps.push(job.qp);
    }
    (results, qps)
}
