//! Partial granules copied up without waiting in place (`fill.rs`): two 512-byte writes
//! into one granule a clone shares with its snapshot, submitted while the base answers
//! nothing, return at once; once the base answers, both land on the granule's old contents
//! and the snapshot keeps its image.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use device_model::backend::{Backend, IoOp, IoRequest, MallocBackend, SharedSource};
use nvme_spec::Status;

use super::commit::{Pending, completions, submit};
use super::io;
use crate::lvol::{Store, StoreOptions, check};

const MIB: u64 = 1 << 20;

/// A base that hands back no completion while its gate is closed (or until it was polled
/// `patience` times: a store that waits in place then ends, and the test sees the polls).
struct Gate {
    inner: Box<dyn Backend>,
    held: Vec<(u64, Status)>,
    open: Arc<AtomicBool>,
    polls: Arc<AtomicU64>,
    patience: u64,
}

impl Backend for Gate {
    fn describe(&self) -> String {
        "gate".into()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        self.inner.submit(req)
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        let polls = self.polls.fetch_add(1, Ordering::Relaxed) + 1;
        let held = &mut self.held;
        self.inner.poll(&mut |t, s| held.push((t, s)));
        if !self.open.load(Ordering::Relaxed) && polls <= self.patience {
            return 0;
        }
        let n = self.held.len();
        for (t, s) in self.held.drain(..) {
            done(t, s);
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len()
    }
}

#[test]
fn partial_writes_to_a_shared_granule_wait_for_their_fill_without_holding_the_caller() {
    let disk = SharedSource::new(Box::new(MallocBackend::new(64 * MIB).unwrap()));
    let open = Arc::new(AtomicBool::new(true));
    let polls = Arc::new(AtomicU64::new(0));
    let base = Gate {
        inner: Box::new(disk.handle().unwrap()),
        held: Vec::new(),
        open: open.clone(),
        polls: polls.clone(),
        patience: 10_000,
    };
    let opts = StoreOptions {
        name: "pool".into(),
        cluster_size: MIB,
        journal_len: None,
    };
    let store = Store::format(Box::new(base), &opts).unwrap();
    store.create("v", 4 * MIB, true).unwrap();
    let old: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    {
        let mut v = store.open("v").unwrap();
        let (st, _) = io::run(&mut v, IoOp::Write { fua: false }, 0, Some(&old), 4096);
        assert_eq!(st, Status::SUCCESS);
    }
    store.snapshot("v", "s").unwrap();
    store.clone_snapshot("s", "c").unwrap();
    let mut c = store.open("c").unwrap();

    open.store(false, Ordering::Relaxed);
    let before = polls.load(Ordering::Relaxed);
    let (b, d) = (vec![0xbbu8; 512], vec![0xddu8; 512]);
    let _w: Vec<Pending> = vec![
        submit(&mut c, 1, IoOp::Write { fua: false }, 512, &b),
        submit(&mut c, 2, IoOp::Write { fua: false }, 2560, &d),
    ];
    assert_eq!(
        polls.load(Ordering::Relaxed),
        before,
        "a partial write waited for the base in place"
    );
    for _ in 0..20 {
        assert_eq!(completions(&mut c), [], "completed with the base silent");
    }
    open.store(true, Ordering::Relaxed);
    let mut got = Vec::new();
    let t = std::time::Instant::now();
    while got.len() < 2 {
        assert!(t.elapsed().as_secs() < 10, "the writes never completed");
        got.extend(completions(&mut c));
    }
    got.sort_unstable_by_key(|&(t, _)| t);
    assert_eq!(got, [(1, Status::SUCCESS), (2, Status::SUCCESS)]);

    let mut want = old.clone();
    want[512..1024].copy_from_slice(&b);
    want[2560..3072].copy_from_slice(&d);
    assert_eq!(
        io::read(&mut c, 0, 4096).1,
        want,
        "the clone: old granule, both writes"
    );
    let mut s = store.open("s").unwrap();
    assert_eq!(
        io::read(&mut s, 0, 4096).1,
        old,
        "the snapshot keeps its image"
    );
    assert!(
        polls.load(Ordering::Relaxed) < 10_000,
        "the base's patience ran out"
    );
    drop((c, s));
    let mut base = store.close().unwrap();
    let report = check(base.as_mut()).unwrap();
    assert!(report.is_clean(), "{:?}", report.errors);
}
