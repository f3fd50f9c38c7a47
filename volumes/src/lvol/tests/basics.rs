//! The store's behaviour without crashes: thin and thick volumes, copy-on-write cost,
//! snapshots and clones deleted in any order, a full store, reload, hostile metadata.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use device_model::backend::{Backend, IoOp, IoRequest, MallocBackend, SharedSource};
use nvme_spec::Status;

use super::crash_disk::CrashDisk;
use super::io::{self, Rng};
use crate::lvol::{LvolError, Store, StoreOptions, check};

const MIB: u64 = 1 << 20;

/// Counts the bytes written through it.
struct Counting {
    inner: Box<dyn Backend>,
    written: Arc<AtomicU64>,
}

impl Backend for Counting {
    fn describe(&self) -> String {
        "counting".into()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        if matches!(req.op, IoOp::Write { .. } | IoOp::WriteZeroes { .. }) {
            self.written.fetch_add(req.len(), Ordering::Relaxed);
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

fn opts(cluster: u64) -> StoreOptions {
    StoreOptions {
        name: "pool".into(),
        cluster_size: cluster,
        journal_len: None,
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

fn disk(size: u64) -> SharedSource {
    SharedSource::new(Box::new(MallocBackend::new(size).unwrap()))
}

#[test]
fn thin_volumes_allocate_on_write_and_read_zeroes_elsewhere() {
    let d = disk(64 * MIB);
    let s = Store::format(Box::new(d.handle().unwrap()), &opts(MIB)).unwrap();
    s.create("t", 16 * MIB, true).unwrap();
    let mut v = s.open("t").unwrap();
    assert_eq!(v.thin_usage(), Some((0, 16 * MIB)));
    let a = pattern(1, 4096);
    assert_eq!(
        io::run(
            &mut v,
            IoOp::Write { fua: false },
            5 * MIB + 8192,
            Some(&a),
            4096
        )
        .0,
        Status::SUCCESS
    );
    let (st, got) = io::read(&mut v, 5 * MIB, 3 * 4096);
    assert_eq!(st, Status::SUCCESS);
    assert!(
        got[..8192].iter().all(|&b| b == 0),
        "the rest of a first-written cluster reads zeroes"
    );
    assert_eq!(&got[8192..], &a[..]);
    assert_eq!(v.thin_usage().unwrap().0, MIB);
    // a 512-byte write inside an unwritten granule keeps the granule's zeroes around it
    let b = pattern(2, 512);
    assert_eq!(
        io::run(
            &mut v,
            IoOp::Write { fua: false },
            7 * MIB + 1024,
            Some(&b),
            512
        )
        .0,
        Status::SUCCESS
    );
    let (_, got) = io::read(&mut v, 7 * MIB, 4096);
    assert!(got[..1024].iter().chain(&got[1536..]).all(|&x| x == 0));
    assert_eq!(&got[1024..1536], &b[..]);
    // deallocating whole clusters returns them
    assert_eq!(
        io::run(&mut v, IoOp::Deallocate { len: 16 * MIB }, 0, None, 0).0,
        Status::SUCCESS
    );
    assert_eq!(v.thin_usage().unwrap().0, 0);
    assert_eq!(io::flush(&mut v), Status::SUCCESS);
    assert!(io::read(&mut v, 5 * MIB, 4096).1.iter().all(|&x| x == 0));
    // out of range and hostile requests get statuses, not panics
    assert_eq!(io::read(&mut v, 16 * MIB, 4096).0, Status::LBA_OUT_OF_RANGE);
    assert_eq!(
        io::run(&mut v, IoOp::Deallocate { len: u64::MAX }, 4096, None, 0).0,
        Status::LBA_OUT_OF_RANGE
    );
}

#[test]
fn a_4k_write_to_a_shared_cluster_copies_nothing_and_snapshots_keep_their_image() {
    let d = disk(64 * MIB);
    let written = Arc::new(AtomicU64::new(0));
    let base = Counting {
        inner: Box::new(d.handle().unwrap()),
        written: written.clone(),
    };
    let s = Store::format(Box::new(base), &opts(MIB)).unwrap();
    s.create("v", 8 * MIB, false).unwrap();
    let mut v = s.open("v").unwrap();
    let old = pattern(3, (8 * MIB) as usize);
    assert_eq!(
        io::run(&mut v, IoOp::Write { fua: false }, 0, Some(&old), 8 * MIB).0,
        Status::SUCCESS
    );
    s.snapshot("v", "snap").unwrap();
    let before = written.load(Ordering::Relaxed);
    let new = pattern(4, 4096);
    assert_eq!(
        io::run(
            &mut v,
            IoOp::Write { fua: false },
            3 * MIB + 40960,
            Some(&new),
            4096
        )
        .0,
        Status::SUCCESS
    );
    let cost = written.load(Ordering::Relaxed) - before;
    assert_eq!(
        cost, 4096,
        "copy-on-write of a 4 KiB write wrote {cost} bytes"
    );
    // the volume reads the new granule over the shared cluster, the snapshot the old
    let (_, got) = io::read(&mut v, 3 * MIB, MIB);
    let mut want = old[(3 * MIB) as usize..(4 * MIB) as usize].to_vec();
    want[40960..45056].copy_from_slice(&new);
    assert_eq!(got, want);
    let mut sn = s.open("snap").unwrap();
    assert_eq!(io::read(&mut sn, 0, 8 * MIB).1, old);
    assert_eq!(io::write_status(&mut sn), crate::lvol::WRITE_PROTECTED);
    // clone the snapshot, write it, then delete the snapshot first: the clone keeps its data
    s.clone_snapshot("snap", "c").unwrap();
    let mut c = s.open("c").unwrap();
    let cw = pattern(5, 8192);
    assert_eq!(
        io::run(
            &mut c,
            IoOp::Write { fua: false },
            100 * 4096,
            Some(&cw),
            8192
        )
        .0,
        Status::SUCCESS
    );
    drop(sn);
    s.delete("snap").unwrap();
    let list = s.list();
    assert!(list.iter().all(|x| x.parent.is_none()), "{list:?}");
    let mut want_c = old.clone();
    want_c[409_600..409_600 + 8192].copy_from_slice(&cw);
    assert_eq!(io::read(&mut c, 0, 8 * MIB).1, want_c);
    // inflate: the clone gets its own clusters; nothing is shared any more
    s.inflate("c").unwrap();
    assert_eq!(io::read(&mut c, 0, 8 * MIB).1, want_c);
    assert!(s.list().iter().all(|x| x.shared == 0), "{:?}", s.list());
    drop((v, c));
    let mut b = s.close().map_err(|(_, e)| e).unwrap();
    let r = check(b.as_mut()).unwrap();
    assert!(r.is_clean(), "{r:?}");
    // and it all loads again
    let (s, rep) = Store::load(b).unwrap();
    assert_eq!(rep.volumes, 2);
    let mut c = s.open("c").unwrap();
    assert_eq!(io::read(&mut c, 0, 8 * MIB).1, want_c);
}

#[test]
fn a_full_store_answers_capacity_exceeded_and_recovers_after_a_delete() {
    let d = disk(32 * MIB);
    let s = Store::format(Box::new(d.handle().unwrap()), &opts(MIB)).unwrap();
    let clusters = s.status().clusters;
    s.create("a", 64 * MIB, true).unwrap();
    s.create("b", 8 * MIB, true).unwrap();
    let mut a = s.open("a").unwrap();
    let mut b = s.open("b").unwrap();
    let block = pattern(6, MIB as usize);
    for i in 0..clusters {
        assert_eq!(
            io::run(
                &mut a,
                IoOp::Write { fua: false },
                i * MIB,
                Some(&block),
                MIB
            )
            .0,
            Status::SUCCESS
        );
    }
    assert_eq!(s.status().clusters_free, 0);
    assert_eq!(a.capacity_warning(), Some(0), "over the 90 % threshold");
    let st = io::run(
        &mut b,
        IoOp::Write { fua: false },
        0,
        Some(&block[..4096]),
        4096,
    )
    .0;
    assert_eq!(st, Status::CAPACITY_EXCEEDED);
    assert!(st.is_dnr());
    // overwrites of owned clusters still work
    assert_eq!(
        io::run(
            &mut a,
            IoOp::Write { fua: false },
            0,
            Some(&block[..4096]),
            4096
        )
        .0,
        Status::SUCCESS
    );
    // a thick volume that does not fit is refused by name
    assert!(matches!(
        s.create("thick", 4 * MIB, false),
        Err(LvolError::NoSpace(_))
    ));
    // deallocating clusters of a returns them; b writes again
    assert_eq!(
        io::run(&mut a, IoOp::Deallocate { len: 4 * MIB }, 0, None, 0).0,
        Status::SUCCESS
    );
    assert_eq!(
        io::run(
            &mut b,
            IoOp::Write { fua: false },
            0,
            Some(&block[..4096]),
            4096
        )
        .0,
        Status::SUCCESS
    );
    drop(a);
    assert!(matches!(s.delete("b"), Err(LvolError::InUse(_))));
    s.delete("a").unwrap();
    assert_eq!(s.status().clusters_free, clusters - 1);
    assert_eq!(b.capacity_warning(), None, "cleared once space returned");
}

#[test]
fn management_refuses_bad_arguments_with_reasons() {
    let d = disk(32 * MIB);
    let s = Store::format(Box::new(d.handle().unwrap()), &opts(MIB)).unwrap();
    s.create("v", 4 * MIB, true).unwrap();
    let e = |r: Result<(), LvolError>| r.unwrap_err().to_string();
    assert!(e(s.create("v", 4096, true)).contains("exists"));
    assert!(e(s.create("", 4096, true)).contains("bad volume name"));
    assert!(e(s.create("a/b", 4096, true)).contains("bad volume name"));
    assert!(e(s.create("x", 0, true)).contains("multiple of 4096"));
    assert!(e(s.create("x", 1000, true)).contains("multiple of 4096"));
    assert!(e(s.create("x", (u64::MAX / 2) & !4095, true)).contains("at most"));
    assert!(e(s.snapshot("nope", "s")).contains("no volume"));
    assert!(e(s.clone_snapshot("v", "c")).contains("not a snapshot"));
    s.snapshot("v", "s").unwrap();
    assert!(e(s.snapshot("s", "s2")).contains("snapshot already"));
    assert!(e(s.resize("s", 8192)).contains("read-only"));
    assert!(e(s.rename("v", "s")).contains("exists"));
    assert!(
        Store::format(Box::new(d.handle().unwrap()), &opts(3000))
            .unwrap_err()
            .to_string()
            .contains("power of two")
    );
}

#[test]
fn corrupt_metadata_is_refused_or_tolerated_never_a_panic() {
    let disk = CrashDisk::junk(4 << 20, 7);
    let s = Store::format(
        Box::new(disk.clone()),
        &StoreOptions {
            name: "p".into(),
            cluster_size: 16 << 10,
            journal_len: Some(64 << 10),
        },
    )
    .unwrap();
    for i in 0..20 {
        s.create(&format!("v{i}"), 64 << 10, i % 2 == 0).unwrap();
    }
    s.snapshot("v1", "s").unwrap();
    s.clone_snapshot("s", "c").unwrap();
    let mut v = s.open("c").unwrap();
    assert_eq!(
        io::run(
            &mut v,
            IoOp::Write { fua: true },
            4096,
            Some(&pattern(1, 8192)),
            8192
        )
        .0,
        Status::SUCCESS
    );
    drop(v);
    let base = s.close().map_err(|(_, e)| e).unwrap();
    drop(base);
    let img = disk.crash_image(&mut Rng(1), 0);
    let meta_end = 400 << 10;
    let mut r = Rng(99);
    let (mut refused, mut loaded) = (0, 0);
    for _ in 0..300 {
        let mut bad = img.clone();
        for _ in 0..=r.below(4) {
            let at = r.below(meta_end) as usize;
            bad[at] ^= 1 << r.below(8);
        }
        let mut d = CrashDisk::new(bad.clone());
        let _ = check(&mut d);
        match Store::load(Box::new(CrashDisk::new(bad))) {
            Ok(_) => loaded += 1,
            Err(_) => refused += 1,
        }
    }
    assert!(
        loaded > 0 && refused > 0,
        "loaded {loaded}, refused {refused}"
    );
}
