//! `vnvme perf nvme-tcp://...`: the same measurement on a namespace backend driven
//! directly (no emulated controller in between): one thread keeps QD requests in flight
//! through [`Backend::submit`]/[`Backend::poll`] on buffers of its own. This is how the
//! NVMe/TCP initiator and a target are measured on loopback.

use std::time::{Duration, Instant};

use device_model::backend::{Backend, GuestBuffers, IoOp, IoRequest};
use nvme_spec::Status;

use super::rng::Rng;
use super::{JobResult, Pattern, PerfError, PerfOptions, Report, clock};

/// Run `opts` against `b` (one worker, no verification).
pub fn run(
    b: &mut dyn Backend,
    opts: &PerfOptions,
    mut progress: impl FnMut(Duration, u64),
) -> Result<Report, PerfError> {
    if opts.workers != 1 || opts.verify {
        return Err(PerfError::Invalid(
            "a backend is measured by one worker without --verify".into(),
        ));
    }
    let qd = opts.queue_depth as usize;
    let size = opts.io_size as usize;
    let units = b.size() / opts.io_size;
    if qd == 0 || qd > 4096 || size == 0 || units == 0 {
        return Err(PerfError::Invalid(
            "queue depth 1..=4096 and an I/O size within the namespace".into(),
        ));
    }
    let mut bufs: Vec<Vec<u8>> = (0..qd).map(|_| vec![0xa5; size]).collect();
    // one iovec per slot, alive (like the buffers) until every request has completed: an
    // asynchronous backend may read the array after submit returns
    let iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: size,
        })
        .collect();
    let mut started = vec![0u64; qd];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut seq = 0u64;
    let mut result = JobResult::empty(1, 0);
    let mut submit = |slot: usize, b: &mut dyn Backend, started: &mut [u64]| {
        let unit = match opts.pattern {
            Pattern::Read | Pattern::Write => {
                seq = (seq + 1) % units;
                seq
            }
            _ => rng.next() % units,
        };
        let write = match opts.pattern {
            Pattern::Write | Pattern::Randwrite => true,
            Pattern::Randrw => (rng.next() % 100) as u8 >= opts.read_percent,
            _ => false,
        };
        started[slot] = clock::ticks();
        b.submit(&IoRequest {
            tag: slot as u64,
            op: if write {
                IoOp::Write { fua: false }
            } else {
                IoOp::Read
            },
            offset: unit * opts.io_size,
            // SAFETY: slot `slot`'s buffer and iovec live until the end of the job, after
            // every request completed (or are leaked if some never did), and nothing else
            // touches a buffer while its slot's request is in flight (a slot is resubmitted
            // only once it completed).
            iov: unsafe { GuestBuffers::from_raw_iovecs(&iovs[slot..=slot]) },
        })
    };
    let calibration = clock::Calibration::start();
    let start = Instant::now();
    for slot in 0..qd {
        if let Err(s) = submit(slot, b, &mut started) {
            return Err(PerfError::Invalid(format!("submit failed: {s:?}")));
        }
    }
    let mut last_report = Instant::now();
    let mut stopping = false;
    let mut outstanding = qd;
    let mut done: Vec<(u64, Status)> = Vec::with_capacity(qd);
    while outstanding > 0 {
        b.poll(&mut |t, s| done.push((t, s)));
        let now = clock::ticks();
        for &(t, s) in &done {
            let slot = t as usize;
            outstanding -= 1;
            result.latency.record(now.wrapping_sub(started[slot]));
            if s.is_success() {
                result.ios += 1;
                result.bytes += opts.io_size;
            } else {
                result.errors += 1;
            }
            if !stopping {
                match submit(slot, b, &mut started) {
                    Ok(()) => outstanding += 1,
                    Err(_) => result.errors += 1,
                }
            }
        }
        done.clear();
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            progress(start.elapsed(), result.ios);
        }
        if !stopping && start.elapsed() >= opts.duration {
            stopping = true;
        }
        if stopping && start.elapsed() >= opts.duration + Duration::from_secs(10) {
            result.errors += outstanding as u64;
            break;
        }
    }
    if outstanding > 0 {
        // the backend may still complete these: their buffers and iovecs must stay valid
        std::mem::forget(iovs);
        std::mem::forget(bufs);
    }
    Ok(Report {
        elapsed: start.elapsed(),
        ns_per_tick: calibration.finish(),
        jobs: vec![result],
        verify: false,
    })
}
