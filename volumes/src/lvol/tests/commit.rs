//! Commits run from the data path's poll: while the base takes its time over a commit's
//! flush, the Flush's submitter returns at once, the store's other volumes keep reading
//! and writing, and the Flush completes when the base does (with what it covered durable).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use device_model::backend::{Backend, GuestBufferList, IoBuffer, IoOp, IoRequest, MallocBackend};
use nvme_spec::Status;

use super::gate::{Hold, MIB, gated_store, mib_store, patience_ran_out};
use super::io;
use crate::lvol::{Store, check};

/// A request kept in flight by the test.
pub(super) struct Pending {
    _buf: IoBuffer,
    _list: GuestBufferList,
}

pub(super) fn submit(b: &mut dyn Backend, tag: u64, op: IoOp, off: u64, data: &[u8]) -> Pending {
    let buf = IoBuffer::new(data.len().max(1));
    buf.write_at(0, data);
    let mut list = GuestBufferList::new();
    if !data.is_empty() {
        list.set_range(buf.buffers(), 0, data.len() as u64);
    }
    b.submit(&IoRequest {
        tag,
        op,
        offset: off,
        iov: list.as_buffers(),
    })
    .expect("submitted");
    Pending {
        _buf: buf,
        _list: list,
    }
}

pub(super) fn completions(b: &mut dyn Backend) -> Vec<(u64, Status)> {
    let mut got = Vec::new();
    b.poll(&mut |t, s| got.push((t, s)));
    got
}

#[test]
fn a_flush_waiting_for_the_base_holds_up_neither_its_submitter_nor_the_other_volumes() {
    let (store, gate, disk) = gated_store(64 * MIB, Hold::Flushes);
    store.create("a", 8 * MIB, true).unwrap();
    store.create("b", 8 * MIB, true).unwrap();
    let mut a = store.open("a").unwrap();
    let mut b = store.open("b").unwrap();
    let data = vec![0xa5u8; 4096];
    // a first write to a thin volume: a mapping the Flush must commit
    let (st, _) = io::run(
        &mut a,
        IoOp::Write { fua: false },
        3 * MIB,
        Some(&data),
        4096,
    );
    assert_eq!(st, Status::SUCCESS);

    gate.close();
    let before = gate.polls();
    let _flush = submit(&mut a, 1, IoOp::Flush, 0, &[]);
    assert_eq!(
        gate.polls(),
        before,
        "submitting a Flush waited for the base in place"
    );
    let _fua = submit(&mut a, 2, IoOp::Write { fua: true }, 4 * MIB, &data);
    // the other volume reads and writes while the commit waits; `a` hears nothing
    for i in 0..50 {
        let (st, _) = io::run(
            &mut b,
            IoOp::Write { fua: false },
            i * 4096,
            Some(&data),
            4096,
        );
        assert_eq!(st, Status::SUCCESS);
        let (st, got) = io::read(&mut b, i * 4096, 4096);
        assert_eq!((st, got), (Status::SUCCESS, data.clone()));
        assert_eq!(completions(&mut a), [], "completed before the base's flush");
    }
    // (each poll gives a running commit a few microseconds of base polls, no more)
    assert!(
        !patience_ran_out(&gate),
        "the store waited for its base in place"
    );
    // a Flush on `b` arriving meanwhile joins the next commit
    let _flush_b = submit(&mut b, 3, IoOp::Flush, 0, &[]);
    gate.open();
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    let t = std::time::Instant::now();
    while got_a.len() < 2 || got_b.is_empty() {
        assert!(t.elapsed().as_secs() < 10, "the commits never ended");
        got_a.extend(completions(&mut a));
        got_b.extend(completions(&mut b));
    }
    got_a.sort_unstable_by_key(|&(t, _)| t);
    assert_eq!(got_a, [(1, Status::SUCCESS), (2, Status::SUCCESS)]);
    assert_eq!(got_b, [(3, Status::SUCCESS)]);
    drop((a, b));

    // what the Flushes covered is in the store a reload finds (no close: as after a crash)
    let image = disk.handle().unwrap();
    std::mem::forget(store);
    let (again, _) = Store::load(Box::new(image)).unwrap();
    let mut a = again.open("a").unwrap();
    assert_eq!(io::read(&mut a, 3 * MIB, 4096).1, data);
    assert_eq!(io::read(&mut a, 4 * MIB, 4096).1, data);
    let mut b = again.open("b").unwrap();
    assert_eq!(io::read(&mut b, 49 * 4096, 4096).1, data);
    drop((a, b));
    let mut base = again.close().unwrap();
    let report = check(base.as_mut()).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

/// A thread holding `store`'s lock (as a management operation would) until the test sends
/// on the returned channel, or for 2 s should the test be stuck in the lock.
fn hold_the_store(store: &Store) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let store = store.clone();
    let holder = std::thread::spawn(move || {
        let _core = store.core();
        held_tx.send(()).unwrap();
        let _ = release_rx.recv_timeout(std::time::Duration::from_secs(2));
    });
    held_rx.recv().unwrap();
    (release_tx, holder)
}

/// While a management operation holds the store (here: the test, through the lock itself),
/// a volume's submit and poll return at once; the request waits in the handle and runs
/// when the lock is free again.
#[test]
fn a_busy_store_lock_holds_up_neither_submit_nor_poll() {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    let store = mib_store(Box::new(MallocBackend::new(32 * MIB).unwrap()));
    store.create("a", 4 * MIB, false).unwrap();
    store.create("t", 4 * MIB, true).unwrap();
    let mut a = store.open("a").unwrap();
    let t_vol = store.open("t").unwrap();
    let usage = t_vol.thin_usage();
    assert_eq!(usage, Some((0, 4 * MIB)));
    let (release_tx, holder) = hold_the_store(&store);
    let data = vec![0x3cu8; 4096];
    let t = Instant::now();
    let _w = submit(&mut a, 7, IoOp::Write { fua: false }, 8192, &data);
    let _f = submit(&mut a, 8, IoOp::Flush, 0, &[]);
    assert_eq!(completions(&mut a), []);
    assert_eq!(
        t_vol.thin_usage(),
        usage,
        "Identify's answer, from the last one"
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "submit, poll or thin_usage waited for the store's lock ({:?})",
        t.elapsed()
    );
    assert_eq!(a.in_flight(), 2);
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    let mut got = Vec::new();
    let t = Instant::now();
    while got.len() < 2 {
        assert!(t.elapsed().as_secs() < 10, "the queued requests never ran");
        got.extend(completions(&mut a));
    }
    assert_eq!(got, [(7, Status::SUCCESS), (8, Status::SUCCESS)]);
    assert_eq!(io::read(&mut a, 8192, 4096).1, data);
    // out of range while queued: refused at submit, as without the queue
    let holder = {
        let store = store.clone();
        let (held_tx, held_rx) = mpsc::channel();
        let h = std::thread::spawn(move || {
            let _core = store.core();
            held_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        });
        held_rx.recv().unwrap();
        h
    };
    let buf = IoBuffer::new(4096);
    let mut list = GuestBufferList::new();
    list.set_range(buf.buffers(), 0, 4096);
    let r = a.submit(&IoRequest {
        tag: 9,
        op: IoOp::Read,
        offset: 4 * MIB,
        iov: list.as_buffers(),
    });
    assert_eq!(r, Err(Status::LBA_OUT_OF_RANGE));
    holder.join().unwrap();
}

/// A write to a full thin store that needs a cluster a Deallocate released waits for the
/// commit that makes it reusable, without the submitter waiting for the base; it then
/// completes and reads back.
#[test]
fn a_write_waiting_for_a_released_cluster_waits_for_its_commit_not_in_place() {
    let (store, gate, _disk) = gated_store(40 * MIB, Hold::Flushes);
    let n = store.status().clusters_free;
    store.create("t", n * MIB, true).unwrap();
    let mut t = store.open("t").unwrap();
    let data = vec![0x6bu8; 4096];
    for c in 0..n {
        let (st, _) = io::run(
            &mut t,
            IoOp::Write { fua: false },
            c * MIB,
            Some(&data),
            4096,
        );
        assert_eq!(st, Status::SUCCESS, "cluster {c}");
    }
    assert_eq!(store.status().clusters_free, 0);
    let (st, _) = io::run(&mut t, IoOp::Deallocate { len: MIB }, 0, None, 0);
    assert_eq!(st, Status::SUCCESS);

    gate.close();
    let before = gate.polls();
    let fresh = vec![0x9eu8; 4096];
    let _w = submit(&mut t, 5, IoOp::Write { fua: false }, 8192, &fresh);
    assert_eq!(
        gate.polls(),
        before,
        "the write waited for the commit in place"
    );
    for _ in 0..20 {
        assert_eq!(
            completions(&mut t),
            [],
            "written before the cluster was free"
        );
    }
    gate.open();
    let mut got = Vec::new();
    let s = std::time::Instant::now();
    while got.is_empty() {
        assert!(s.elapsed().as_secs() < 10, "the parked write never ran");
        got.extend(completions(&mut t));
    }
    assert_eq!(got, [(5, Status::SUCCESS)]);
    let (st, back) = io::read(&mut t, 8192, 4096);
    assert_eq!((st, back), (Status::SUCCESS, fresh));
    // with nothing released, a write to an unmapped cluster is refused at once
    let (st, _) = io::run(&mut t, IoOp::Deallocate { len: MIB }, MIB, None, 0);
    assert_eq!(st, Status::SUCCESS);
    assert_eq!(io::flush(&mut t), Status::SUCCESS);
    assert_eq!(
        io::write_status(&mut t),
        Status::SUCCESS,
        "cluster 0 is mapped"
    );
    let (st, _) = io::run(&mut t, IoOp::Write { fua: false }, MIB, Some(&data), 4096);
    assert_eq!(st, Status::SUCCESS, "the cluster the flush released");
    let (st, _) = io::run(&mut t, IoOp::Deallocate { len: MIB }, MIB, None, 0);
    assert_eq!(st, Status::SUCCESS);
    drop(t);
    store.create("u", 2 * MIB, true).unwrap();
    let mut u = store.open("u").unwrap();
    let two = vec![1u8; 8192];
    let (st, _) = io::run(
        &mut u,
        IoOp::Write { fua: false },
        MIB - 4096,
        Some(&two),
        8192,
    );
    assert_eq!(st, Status::CAPACITY_EXCEEDED, "two clusters, one coming");
}

/// Holds the completion of writes at one base offset (the test picks it) until told.
struct HoldAt {
    inner: Box<dyn Backend>,
    /// The offset of the last data write seen, and the offset whose writes are held.
    last_write: Arc<AtomicU64>,
    hold: Arc<AtomicU64>,
    tags: Vec<u64>,
    held: Vec<(u64, Status)>,
}

impl Backend for HoldAt {
    fn describe(&self) -> String {
        "hold-at".into()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        if matches!(req.op, IoOp::Write { .. }) {
            self.last_write.store(req.offset, Ordering::Relaxed);
            if req.offset == self.hold.load(Ordering::Relaxed) {
                self.tags.push(req.tag);
            }
        }
        self.inner.submit(req)
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        let (tags, held) = (&mut self.tags, &mut self.held);
        let mut n = self.inner.poll(&mut |t, s| {
            if tags.contains(&t) {
                held.push((t, s));
            } else {
                done(t, s);
            }
        });
        if self.hold.load(Ordering::Relaxed) == u64::MAX {
            self.tags.clear();
            for (t, s) in self.held.drain(..) {
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

/// A cluster a Deallocate released is not handed out again while a write to it is still in
/// flight (it would land in the next owner's data), and is as soon as that write ends.
#[test]
fn a_released_cluster_is_reused_only_once_its_last_request_ended() {
    let last_write = Arc::new(AtomicU64::new(0));
    let hold = Arc::new(AtomicU64::new(u64::MAX));
    let base = HoldAt {
        inner: Box::new(MallocBackend::new(32 * MIB).unwrap()),
        last_write: last_write.clone(),
        hold: hold.clone(),
        tags: Vec::new(),
        held: Vec::new(),
    };
    let store = mib_store(Box::new(base));
    store.create("a", 4 * MIB, true).unwrap();
    let mut a = store.open("a").unwrap();
    let data = vec![0x11u8; 4096];
    let (st, _) = io::run(&mut a, IoOp::Write { fua: false }, 0, Some(&data), 4096);
    assert_eq!(st, Status::SUCCESS);
    let block = last_write.load(Ordering::Relaxed);
    assert_eq!(io::flush(&mut a), Status::SUCCESS);
    let free = store.status().clusters_free;
    // a second write to the same block stays in flight
    hold.store(block, Ordering::Relaxed);
    let _w = submit(&mut a, 1, IoOp::Write { fua: false }, 0, &data);
    let (st, _) = io::run(&mut a, IoOp::Deallocate { len: MIB }, 0, None, 0);
    assert_eq!(st, Status::SUCCESS);
    let _f = submit(&mut a, 2, IoOp::Flush, 0, &[]);
    let mut got = Vec::new();
    let t = std::time::Instant::now();
    while !got.iter().any(|&(t, _)| t == 2) {
        assert!(t.elapsed().as_secs() < 10, "the Flush never completed");
        got.extend(completions(&mut a));
    }
    assert_eq!(
        store.status().clusters_free,
        free,
        "the released cluster was handed out with a write in flight to it"
    );
    hold.store(u64::MAX, Ordering::Relaxed);
    while !got.iter().any(|&(t, _)| t == 1) {
        assert!(t.elapsed().as_secs() < 10, "the held write never completed");
        got.extend(completions(&mut a));
    }
    completions(&mut a);
    assert_eq!(store.status().clusters_free, free + 1, "released once idle");
}

/// A RAM base that counts whole-cluster writes (an inflate's copies).
struct CountingCopies {
    inner: MallocBackend,
    copies: Arc<AtomicU64>,
}

impl Backend for CountingCopies {
    fn describe(&self) -> String {
        "counting".into()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        if matches!(req.op, IoOp::Write { .. }) && req.len() == MIB {
            self.copies.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.submit(req)
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        self.inner.poll(done)
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
}

/// An inflate copies a volume's clusters in steps and frees the store's lock between them:
/// another volume of the store (another tenant's namespace) keeps completing requests while
/// it runs, instead of waiting for the whole copy. Meanwhile the volume cannot be deleted,
/// resized or snapshotted; afterwards it is independent and reads what its snapshot held.
#[test]
fn an_inflate_leaves_the_stores_other_volumes_running_between_its_steps() {
    use std::sync::atomic::AtomicBool;

    let copies = Arc::new(AtomicU64::new(0));
    let store = mib_store(Box::new(CountingCopies {
        inner: MallocBackend::new(200 * MIB).unwrap(),
        copies: Arc::clone(&copies),
    }));
    store.create("base", 64 * MIB, false).unwrap();
    {
        let mut b = store.open("base").unwrap();
        for i in 0..64u64 {
            let data = vec![i as u8 ^ 0x5a; 4096];
            let st = io::run(
                &mut b,
                IoOp::Write { fua: false },
                i * MIB,
                Some(&data),
                4096,
            )
            .0;
            assert_eq!(st, Status::SUCCESS);
        }
    }
    store.snapshot("base", "snap").unwrap();
    store.clone_snapshot("snap", "clone").unwrap();
    store.create("other", 4 * MIB, false).unwrap();
    let mut other = store.open("other").unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let inflate = {
        let (store, done) = (store.clone(), Arc::clone(&done));
        std::thread::spawn(move || {
            let r = store.inflate("clone");
            done.store(true, Ordering::Release);
            r
        })
    };
    // requests of the other volume, one at a time, counted when they complete with some
    // clusters copied and not all; and the management calls the inflate refuses
    let copied = || copies.load(Ordering::Relaxed);
    let (mut during, mut refused) = (0, 0);
    while !done.load(Ordering::Acquire) {
        assert_eq!(io::read(&mut other, 0, 4096).0, Status::SUCCESS);
        if (1..64).contains(&copied()) {
            during += 1;
        }
        if refused == 0 && (1..64).contains(&copied()) {
            let e = store.snapshot("clone", "snap2").unwrap_err().to_string();
            if e.contains("an inflate or decouple is under way") {
                refused += 1;
                let e = store.resize("clone", 128 * MIB).unwrap_err().to_string();
                assert!(e.contains("under way"), "{e}");
            }
        }
    }
    inflate.join().unwrap().unwrap();
    assert_eq!(copied(), 64, "one copy per cluster");
    assert!(
        during >= 8,
        "only {during} requests of another volume completed during the inflate"
    );
    assert_eq!(
        refused, 1,
        "the snapshot was not refused during the inflate"
    );
    let list = store.list();
    let clone = list.iter().find(|v| v.name == "clone").unwrap();
    assert_eq!(
        (clone.parent.as_ref(), clone.shared, clone.thin),
        (None, 0, false)
    );
    drop(other);
    let mut c = store.open("clone").unwrap();
    for i in [0u64, 31, 63] {
        let (st, data) = io::read(&mut c, i * MIB, 4096);
        assert_eq!(
            (st, data[0], data[4095]),
            (Status::SUCCESS, i as u8 ^ 0x5a, i as u8 ^ 0x5a)
        );
    }
    drop(c);
    store.snapshot("clone", "snap2").unwrap();
}

/// A volume's handle dropped while a management operation holds the store (a namespace
/// detached on its reactor) returns at once; the volume counts as closed from the next
/// holder of the lock on (it can be deleted then).
#[test]
fn a_handle_dropped_while_the_store_is_busy_does_not_wait_for_it() {
    use std::time::{Duration, Instant};

    let store = mib_store(Box::new(MallocBackend::new(32 * MIB).unwrap()));
    store.create("a", 4 * MIB, false).unwrap();
    let a = store.open("a").unwrap();
    let (release_tx, holder) = hold_the_store(&store);
    let t = Instant::now();
    drop(a);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the drop waited for the store's lock ({:?})",
        t.elapsed()
    );
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    store.delete("a").unwrap();
    // and the user slot is free again: a new handle works
    store.create("b", 4 * MIB, false).unwrap();
    let mut b = store.open("b").unwrap();
    assert_eq!(io::read(&mut b, 0, 4096).0, Status::SUCCESS);
}
