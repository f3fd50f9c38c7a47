//! A base whose completions the test holds back (the Flushes only, or all of them), and a
//! store on it: to show what does not wait for the base in place.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use device_model::backend::{Backend, IoOp, IoRequest, MallocBackend, SharedSource};
use nvme_spec::Status;

use crate::lvol::{Store, StoreOptions};

pub const MIB: u64 = 1 << 20;

/// How long a closed gate holds completions at most: a store that waits for the base in
/// place then ends instead of hanging the test, which sees the polls it made.
const PATIENCE: Duration = Duration::from_secs(2);

/// What a closed gate holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    Flushes,
    All,
}

/// The test's side of a gate.
#[derive(Clone, Debug)]
pub struct GateControl {
    open: Arc<AtomicBool>,
    polls: Arc<AtomicU64>,
    closed_at: Arc<Mutex<Instant>>,
    expired: Arc<AtomicBool>,
}

impl GateControl {
    pub fn close(&self) {
        *self.closed_at.lock().unwrap() = Instant::now();
        self.open.store(false, Ordering::Relaxed);
    }
    pub fn open(&self) {
        self.open.store(true, Ordering::Relaxed);
    }
    /// Polls of the base so far.
    pub fn polls(&self) -> u64 {
        self.polls.load(Ordering::Relaxed)
    }
}

/// The base (over a RAM disk handle), gate open.
struct Gated {
    inner: Box<dyn Backend>,
    hold: Hold,
    flushes: Vec<u64>,
    held: Vec<(u64, Status)>,
    ctl: GateControl,
}

impl Backend for Gated {
    fn describe(&self) -> String {
        "gated".into()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        if req.op == IoOp::Flush {
            self.flushes.push(req.tag);
        }
        self.inner.submit(req)
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        self.ctl.polls.fetch_add(1, Ordering::Relaxed);
        let (hold, flushes, held) = (self.hold, &mut self.flushes, &mut self.held);
        let mut n = self.inner.poll(&mut |t, s| {
            if hold == Hold::All || flushes.contains(&t) {
                held.push((t, s));
            } else {
                done(t, s);
            }
        });
        let open = self.ctl.open.load(Ordering::Relaxed);
        if !open && self.ctl.closed_at.lock().unwrap().elapsed() > PATIENCE {
            self.ctl.expired.store(true, Ordering::Relaxed);
        }
        if open || self.ctl.expired.load(Ordering::Relaxed) {
            for (t, s) in self.held.drain(..) {
                self.flushes.retain(|&f| f != t);
                done(t, s);
                n += 1;
            }
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len()
    }
}

/// A store of 1 MiB clusters on a gated RAM disk of `size` bytes (the disk is returned for
/// reloads); the gate is open.
pub fn gated_store(size: u64, hold: Hold) -> (Store, GateControl, SharedSource) {
    let disk = SharedSource::new(Box::new(MallocBackend::new(size).unwrap()));
    let ctl = GateControl {
        open: Arc::new(AtomicBool::new(true)),
        polls: Arc::new(AtomicU64::new(0)),
        closed_at: Arc::new(Mutex::new(Instant::now())),
        expired: Arc::new(AtomicBool::new(false)),
    };
    let base = Gated {
        inner: Box::new(disk.handle().unwrap()),
        hold,
        flushes: Vec::new(),
        held: Vec::new(),
        ctl: ctl.clone(),
    };
    (mib_store(Box::new(base)), ctl, disk)
}

/// A store of 1 MiB clusters on `base`.
pub fn mib_store(base: Box<dyn Backend>) -> Store {
    let opts = StoreOptions {
        name: "pool".into(),
        cluster_size: MIB,
        journal_len: None,
    };
    Store::format(base, &opts).unwrap()
}

/// Whether the gate's patience ran out (the store waited in place long enough to open it).
pub fn patience_ran_out(ctl: &GateControl) -> bool {
    ctl.expired.load(Ordering::Relaxed)
}
