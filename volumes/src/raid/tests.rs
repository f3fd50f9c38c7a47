//! Arrays over RAM members: data lands where the layout says, mirrors fail over, the
//! superblock finds the array again, the bitmap limits resync and rebuild, the rebuild
//! keeps to its rate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use device_model::backend::{Backend, IoBuffer, IoOp, IoRequest, MallocBackend, SharedSource};
use nvme_spec::Status;

use super::assemble::sync_io;
use super::*;

const MIB: u64 = 1 << 20;

/// A member that can be made to fail every request (a target that went away).
struct Flaky {
    inner: Box<dyn Backend>,
    fail: Arc<AtomicBool>,
    failed: Vec<(u64, Status)>,
}

impl Backend for Flaky {
    fn describe(&self) -> String {
        "flaky".into()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        if self.fail.load(Ordering::Relaxed) {
            self.failed.push((req.tag, Status::HOST_PATHING_ERROR));
            return Ok(());
        }
        self.inner.submit(req)
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        let mut n = self.inner.poll(done);
        for (t, s) in self.failed.drain(..) {
            done(t, s);
            n += 1;
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.failed.len()
    }
}

/// `n` RAM disks of `size` bytes, each shared: the array gets one handle, the test keeps
/// the source to look at the bytes or assemble again.
fn disks(n: usize, size: u64) -> Vec<SharedSource> {
    (0..n)
        .map(|_| SharedSource::new(Box::new(MallocBackend::new(size).unwrap())))
        .collect()
}

fn members(d: &[SharedSource]) -> Vec<MemberIn> {
    d.iter()
        .enumerate()
        .map(|(i, s)| MemberIn {
            describe: format!("m{i}"),
            backend: Box::new(s.handle().unwrap()),
        })
        .collect()
}

fn flaky(d: &SharedSource, fail: &Arc<AtomicBool>) -> Box<dyn Backend> {
    Box::new(Flaky {
        inner: Box::new(d.handle().unwrap()),
        fail: fail.clone(),
        failed: Vec::new(),
    })
}

pub(super) fn io(
    b: &mut dyn Backend,
    op: IoOp,
    off: u64,
    data: Option<&[u8]>,
    len: u64,
) -> (Status, Vec<u8>) {
    let buf = IoBuffer::new(len as usize);
    if let Some(d) = data {
        buf.write_at(0, d);
    }
    let (s, buf) = sync_io(b, op, off, buf, len);
    let mut out = vec![0u8; len as usize];
    if let Some(buf) = buf {
        buf.read_at(0, &mut out);
    }
    (s, out)
}

fn write(b: &mut dyn Backend, off: u64, data: &[u8]) -> Status {
    io(
        b,
        IoOp::Write { fua: false },
        off,
        Some(data),
        data.len() as u64,
    )
    .0
}

fn read(b: &mut dyn Backend, off: u64, len: u64) -> Vec<u8> {
    let (s, v) = io(b, IoOp::Read, off, None, len);
    assert_eq!(s, Status::SUCCESS, "read {off}+{len}");
    v
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64 * 31 + seed * 7 + 1) as u8)
        .collect()
}

fn member_bytes(d: &SharedSource, off: u64, len: u64) -> Vec<u8> {
    let mut h = d.handle().unwrap();
    read(&mut h, DATA_OFFSET + off, len)
}

#[test]
fn every_level_reads_back_what_was_written_and_places_it_by_the_layout() {
    for (level, n) in [
        (Level::Concat, 3),
        (Level::Raid0, 3),
        (Level::Raid1, 2),
        (Level::Raid10, 4),
    ] {
        let d = disks(n, 4 * MIB);
        let (mut a, _h) = create("t", level, 16 << 10, members(&d), 0).unwrap();
        let size = a.size();
        let mut model = vec![0u8; size as usize];
        let mut seed = 7u64;
        for k in 0..60u64 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (seed >> 20) % (size / 512) * 512;
            let len = (((seed >> 8) % 256 + 1) * 512).min(size - off);
            let data = pattern(k, len as usize);
            assert_eq!(write(&mut a, off, &data), Status::SUCCESS, "{level:?}");
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        assert_eq!(read(&mut a, 0, size), model, "{level:?}");
        // Write Zeroes, Deallocate and Flush pass through, split like writes
        for op in [
            IoOp::WriteZeroes { len: 40960 },
            IoOp::Deallocate { len: 40960 },
        ] {
            assert_eq!(io(&mut a, op, 8192, None, 0).0, Status::SUCCESS);
        }
        assert_eq!(io(&mut a, IoOp::Flush, 0, None, 0).0, Status::SUCCESS);
        model[8192..8192 + 40960].fill(0);
        assert_eq!(read(&mut a, 0, size), model, "{level:?}");
        // each member holds exactly what the layout says
        let layout = a.layout.clone();
        for leg in 0..layout.legs() {
            for slot in layout.slots(leg) {
                let bytes = member_bytes(&d[slot], 0, layout.leg_size(leg));
                for (i, chunk) in bytes.chunks(4096).enumerate() {
                    let at = layout.array_offset(leg, i as u64 * 4096) as usize;
                    assert_eq!(chunk, &model[at..at + 4096], "{level:?} slot {slot}");
                }
            }
        }
        assert_eq!(a.status().state, "online");
        // out of range
        assert_eq!(
            a.submit(&IoRequest {
                tag: 1,
                op: IoOp::Read,
                offset: size,
                iov: IoBuffer::new(512).buffers(),
            }),
            Err(Status::LBA_OUT_OF_RANGE)
        );
    }
}

#[test]
fn raid1_survives_a_failing_member_and_reads_fail_over() {
    let d = disks(2, 4 * MIB);
    let fail = Arc::new(AtomicBool::new(false));
    let mut m = members(&d);
    m[1].backend = flaky(&d[1], &fail);
    let (mut a, h) = create("r1", Level::Raid1, DEFAULT_STRIP, m, 0).unwrap();
    let data = pattern(1, 65536);
    assert_eq!(write(&mut a, 0, &data), Status::SUCCESS);
    fail.store(true, Ordering::Relaxed);
    // reads balanced onto the failing member are retried on the other: no error
    for _ in 0..8 {
        assert_eq!(read(&mut a, 0, 65536), data);
    }
    let more = pattern(2, 65536);
    assert_eq!(write(&mut a, 65536, &more), Status::SUCCESS);
    assert_eq!(read(&mut a, 65536, 65536), more);
    let st = h.status();
    assert_eq!(st.state, "degraded");
    assert_eq!(st.members[1].state, "missing");
    assert!(st.members[0].reads > 0);
    // the survivor's superblock records the loss, at a newer generation
    let mut h0 = d[0].handle().unwrap();
    let sb = read_superblock("m0", &mut h0).unwrap();
    assert_eq!(sb.slots[1].state, superblock::SlotState::Missing);
    assert!(sb.generation > 1);
    // removing the last in-sync copy is refused
    assert!(h.remove_member(0, Some(&mut a)).is_err());
}

#[test]
fn a_returning_member_gets_only_the_regions_it_missed_and_mirrors_end_identical() {
    let size = 64 * MIB;
    let d = disks(2, size);
    let fail = Arc::new(AtomicBool::new(false));
    let mut m = members(&d);
    m[1].backend = flaky(&d[1], &fail);
    let (mut a, h) = create("r1", Level::Raid1, DEFAULT_STRIP, m, 0).unwrap();
    for k in 0..8u64 {
        assert_eq!(
            write(&mut a, k * 4 * MIB, &pattern(k, 65536)),
            Status::SUCCESS
        );
    }
    fail.store(true, Ordering::Relaxed);
    // written while member 1 is gone: three regions
    for k in 0..3u64 {
        assert_eq!(
            write(&mut a, k * 8 * MIB + 4096, &pattern(k + 9, 8192)),
            Status::SUCCESS
        );
    }
    assert_eq!(h.status().state, "degraded");
    // it comes back (same disk): a partial rebuild
    let mut back: Box<dyn Backend> = Box::new(d[1].handle().unwrap());
    let sb = read_superblock("m1", back.as_mut()).ok();
    let out = h.add_member(back, "m1".into(), sb, Some(&mut a)).unwrap();
    assert_eq!(
        out,
        AddOutcome {
            slot: 1,
            partial: true
        }
    );
    assert!(a.poll_until(Duration::from_secs(20), |a| a.last_rebuild().is_some()));
    let p = a.last_rebuild().unwrap().clone();
    assert!(p.finished, "{p:?}");
    assert_eq!(p.copied, 3 * MIB, "three 1 MiB regions, not {size} bytes");
    assert_eq!(h.status().state, "online");
    assert_eq!(
        member_bytes(&d[0], 0, size - DATA_OFFSET),
        member_bytes(&d[1], 0, size - DATA_OFFSET)
    );
}

#[test]
fn after_an_unclean_stop_assembly_finds_the_array_and_resyncs_only_dirty_regions() {
    let d = disks(2, 32 * MIB);
    let (mut a, _h) = create("crash", Level::Raid1, DEFAULT_STRIP, members(&d), 0).unwrap();
    let uuid = a.uuid;
    assert_eq!(write(&mut a, 5 * MIB, &pattern(3, 4096)), Status::SUCCESS);
    assert_eq!(write(&mut a, 9 * MIB, &pattern(4, 4096)), Status::SUCCESS);
    // make the mirrors differ in a dirty region behind the array's back (a write that
    // reached one member only when the power went)
    let mut h1 = d[1].handle().unwrap();
    assert_eq!(
        write(&mut h1, DATA_OFFSET + 9 * MIB, &pattern(5, 4096)),
        Status::SUCCESS
    );
    std::mem::forget(a); // no clean stop (a crash): the bits stay set on disk
    let got = assemble(Some("crash"), members(&d), 0).unwrap();
    let mut a = got.array;
    assert!(got.refused.is_empty(), "{:?}", got.refused);
    assert_eq!(a.uuid, uuid);
    assert!(a.poll_until(Duration::from_secs(20), |a| a.last_rebuild().is_some()));
    let p = a.last_rebuild().unwrap();
    assert_eq!((p.regions, p.copied), (2, 2 * MIB), "{p:?}");
    assert_eq!(
        member_bytes(&d[0], 9 * MIB, 4096),
        member_bytes(&d[1], 9 * MIB, 4096)
    );
    // the bits clear lazily once idle
    assert!(
        a.poll_until(Duration::from_secs(5), |a| a.bitmap.count_set() == 0
            && !a.meta_busy())
    );
}

#[test]
fn assembly_refuses_foreign_stale_and_corrupt_members() {
    let d = disks(2, 8 * MIB);
    let fail = Arc::new(AtomicBool::new(false));
    let mut m = members(&d);
    m[1].backend = flaky(&d[1], &fail);
    let (mut a, _h) = create("a", Level::Raid1, DEFAULT_STRIP, m, 0).unwrap();
    fail.store(true, Ordering::Relaxed);
    assert_eq!(write(&mut a, 0, &pattern(1, 4096)), Status::SUCCESS);
    drop(a);
    // member 1 missed a generation: stale
    let got = assemble(None, members(&d), 0).unwrap();
    assert!(
        matches!(got.refused[..], [ArrayError::StaleGeneration { .. }]),
        "{:?}",
        got.refused
    );
    assert_eq!(got.handle.status().state, "degraded");
    drop(got);
    // a member of another array
    let other = disks(2, 8 * MIB);
    let (b, _) = create("b", Level::Raid1, DEFAULT_STRIP, members(&other), 0).unwrap();
    drop(b);
    let mut mixed = members(&d);
    mixed.push(MemberIn {
        describe: "other".into(),
        backend: Box::new(other[0].handle().unwrap()),
    });
    let got = assemble(Some("a"), mixed, 0).unwrap();
    assert!(
        got.refused
            .iter()
            .any(|e| matches!(e, ArrayError::ForeignArray { .. })),
        "{:?}",
        got.refused
    );
    drop(got);
    // a corrupt superblock
    let mut h = d[0].handle().unwrap();
    let mut raw = read(&mut h, 0, 4096);
    raw[200] ^= 0xff;
    assert_eq!(write(&mut h, 0, &raw), Status::SUCCESS);
    let e = read_superblock("m0", &mut h).unwrap_err();
    assert!(matches!(
        e,
        ArrayError::Superblock {
            source: SuperblockError::BadCrc { .. },
            ..
        }
    ));
    // creating over a member that carries an array is refused
    assert!(matches!(
        create("c", Level::Raid1, DEFAULT_STRIP, members(&other), 0),
        Err(ArrayError::InUse { .. })
    ));
    // bad geometry
    assert!(
        create(
            "c",
            Level::Raid10,
            DEFAULT_STRIP,
            members(&disks(3, 8 * MIB)),
            0
        )
        .is_err()
    );
    assert!(create("c", Level::Raid0, 1000, members(&disks(2, 8 * MIB)), 0).is_err());
}

#[test]
fn a_full_rebuild_keeps_to_its_rate_while_guest_io_goes_on() {
    let d = disks(2, 9 * MIB); // 8 MiB of data
    let fail = Arc::new(AtomicBool::new(false));
    let mut m = members(&d);
    m[1].backend = flaky(&d[1], &fail);
    let (mut a, h) = create("rate", Level::Raid1, DEFAULT_STRIP, m, 0).unwrap();
    fail.store(true, Ordering::Relaxed);
    assert_eq!(write(&mut a, 0, &pattern(1, 4096)), Status::SUCCESS);
    // a blank replacement: full rebuild at 16 MB/s
    let fresh = disks(1, 9 * MIB);
    h.set_rate(16_000_000, Some(&mut a));
    let out = h
        .add_member(
            Box::new(fresh[0].handle().unwrap()),
            "new".into(),
            None,
            Some(&mut a),
        )
        .unwrap();
    assert!(!out.partial);
    let t = Instant::now();
    let mut guest_ios = 0;
    while a.last_rebuild().is_none() {
        // guest I/O during the rebuild
        assert_eq!(
            write(&mut a, 4 * MIB, &pattern(guest_ios, 4096)),
            Status::SUCCESS
        );
        assert_eq!(read(&mut a, 4 * MIB, 4096), pattern(guest_ios, 4096));
        guest_ios += 1;
        assert!(t.elapsed() < Duration::from_secs(20));
    }
    let secs = t.elapsed().as_secs_f64();
    let p = a.last_rebuild().unwrap();
    assert!(p.finished && p.copied == 8 * MIB, "{p:?}");
    // 8 MiB at 16 MB/s: about half a second (one chunk of burst)
    assert!(secs > 0.4, "{secs} s: not rate limited");
    assert!(guest_ios > 10, "guest I/O went on: {guest_ios}");
    assert_eq!(
        member_bytes(&d[0], 0, 8 * MIB),
        member_bytes(&fresh[0], 0, 8 * MIB)
    );
}

#[test]
fn a_driven_array_rebuilds_with_nobody_polling_it() {
    let d = disks(2, 10 * MIB);
    let fail = Arc::new(AtomicBool::new(false));
    let mut m = members(&d);
    m[1].backend = flaky(&d[1], &fail);
    let (mut a, h) = create("driven", Level::Raid1, DEFAULT_STRIP, m, 0).unwrap();
    fail.store(true, Ordering::Relaxed);
    assert_eq!(write(&mut a, MIB, &pattern(1, 8192)), Status::SUCCESS);
    let driven = DrivenArray::new(a);
    assert_eq!(driven.in_flight(), 0, "background work is not guest I/O");
    // a command and the whole rebuild, with no poll from anyone
    let fresh = disks(1, 10 * MIB);
    let out = h
        .add_member(
            Box::new(fresh[0].handle().unwrap()),
            "new".into(),
            None,
            None,
        )
        .unwrap();
    assert_eq!(out.slot, 1);
    let t = Instant::now();
    while h.status().last_rebuild.is_none_or(|p| !p.finished) {
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", h.status());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(h.status().state, "online");
    let mut a = driven.into_array();
    assert_eq!(read(&mut a, MIB, 8192), pattern(1, 8192));
    assert_eq!(
        member_bytes(&d[0], MIB, 8192),
        member_bytes(&fresh[0], MIB, 8192)
    );
}

#[test]
fn a_rebuild_stopped_by_a_failing_source_is_tried_again() {
    let d = disks(2, 12 * MIB);
    let (f0, f1) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut m = members(&d);
    m[0].backend = flaky(&d[0], &f0);
    m[1].backend = flaky(&d[1], &f1);
    let (mut a, h) = create("retry", Level::Raid1, DEFAULT_STRIP, m, 0).unwrap();
    f1.store(true, Ordering::Relaxed);
    for k in 0..4 {
        assert_eq!(
            write(&mut a, k * 2 * MIB, &pattern(k, 4096)),
            Status::SUCCESS
        );
    }
    // the source fails while the member is rebuilt: stopped, then tried again
    f0.store(true, Ordering::Relaxed);
    let back: Box<dyn Backend> = Box::new(d[1].handle().unwrap());
    h.add_member(back, "m1".into(), None, Some(&mut a)).unwrap();
    assert!(a.poll_until(Duration::from_secs(5), |a| {
        a.last_rebuild().is_some_and(|p| p.aborted.is_some())
    }));
    f0.store(false, Ordering::Relaxed);
    assert!(a.poll_until(Duration::from_secs(10), |a| {
        a.last_rebuild().is_some_and(|p| p.finished)
    }));
    assert_eq!(h.status().state, "online");
    for k in 0..4 {
        assert_eq!(member_bytes(&d[1], k * 2 * MIB, 4096), pattern(k, 4096));
    }
}

/// Once warm, requests reuse the records and lists of earlier ones: none grows.
/// A member that refuses every data read at submit (superblock I/O passes).
struct Refusing(Box<dyn Backend>);

impl Backend for Refusing {
    fn describe(&self) -> String {
        "refusing".into()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        if req.op == IoOp::Read && req.offset >= DATA_OFFSET {
            return Err(Status::INVALID_FIELD);
        }
        self.0.submit(req)
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        self.0.poll(done)
    }
    fn in_flight(&self) -> usize {
        self.0.in_flight()
    }
}

#[test]
fn the_fast_path_hands_back_any_tag_and_a_members_refusal_is_the_requests() {
    let d = disks(2, 10 * MIB);
    let (mut a, _h) = create("fast", Level::Raid0, DEFAULT_STRIP, members(&d), 0).unwrap();
    let buf = IoBuffer::new(4096);
    let list = device_model::backend::GuestBufferList::of(buf.buffers());
    // tags using every bit (a shared namespace folds its user index into the top byte)
    let tags = [u64::MAX - 3, 0x0100_0000_0000_0005, 7];
    for (k, &tag) in tags.iter().enumerate() {
        let op = if k == 1 {
            IoOp::Write { fua: false }
        } else {
            IoOp::Read
        };
        a.submit(&IoRequest {
            tag,
            op,
            offset: k as u64 * DEFAULT_STRIP,
            iov: list.as_buffers(),
        })
        .unwrap();
    }
    assert_eq!(a.in_flight, 3, "guest requests in flight");
    // a step with no caller (a driver thread's) keeps the completions for the next poll
    a.step();
    let mut got = Vec::new();
    while got.len() < 3 {
        a.poll(&mut |t, s| got.push((t, s)));
    }
    got.sort_unstable_by_key(|g| g.0);
    let mut want: Vec<_> = tags.iter().map(|&t| (t, Status::SUCCESS)).collect();
    want.sort_unstable_by_key(|w| w.0);
    assert_eq!(got, want);
    assert_eq!(a.in_flight, 0);
    let st = a.status();
    assert_eq!(st.members[0].reads + st.members[1].reads, 2);
    assert_eq!(st.members[0].writes + st.members[1].writes, 1);

    // a member that refuses: the guest's request is refused with its status, nothing in flight
    let d = disks(2, 10 * MIB);
    let mut m = members(&d);
    m[1].backend = Box::new(Refusing(Box::new(d[1].handle().unwrap())));
    let (mut a, _h) = create("refused", Level::Raid0, DEFAULT_STRIP, m, 0).unwrap();
    let r = a.submit(&IoRequest {
        tag: 1,
        op: IoOp::Read,
        offset: DEFAULT_STRIP, // the second strip: member 1
        iov: list.as_buffers(),
    });
    assert_eq!(r, Err(Status::INVALID_FIELD));
    assert_eq!(a.in_flight, 0);
    assert_eq!(a.status().members[1].errors, 1);
    assert_eq!(
        read(&mut a, 0, 4096),
        vec![0; 4096],
        "member 0 still serves"
    );
}

#[test]
fn a_driven_array_parks_after_guest_io_and_its_thread_steps_it() {
    let d = disks(2, 10 * MIB);
    let (a, h) = create("baton", Level::Raid1, DEFAULT_STRIP, members(&d), 0).unwrap();
    let mut driven = DrivenArray::new(a);
    // guest I/O through the handle: the reactor side takes the array and gives it back
    for k in 0..8u64 {
        assert_eq!(
            write(&mut driven, k * MIB, &pattern(k, 8192)),
            Status::SUCCESS
        );
        assert_eq!(read(&mut driven, k * MIB, 8192), pattern(k, 8192));
    }
    assert_eq!(driven.in_flight(), 0);
    // nobody polls now: the thread must have the array to clear the write-intent bits
    let t = Instant::now();
    while h.status().dirty_regions > 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", h.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut a = driven.into_array();
    assert_eq!(read(&mut a, 3 * MIB, 8192), pattern(3, 8192));
}

#[test]
fn the_io_path_allocates_nothing_once_warm() {
    for level in [Level::Raid0, Level::Raid10] {
        let d = disks(4, 8 * MIB);
        let (mut a, _h) = create("warm", level, 16 << 10, members(&d), 0).unwrap();
        let bufs: Vec<IoBuffer> = (0..4).map(|_| IoBuffer::new(64 << 10)).collect();
        let mut lists: Vec<device_model::backend::GuestBufferList> = bufs
            .iter()
            .map(|b| device_model::backend::GuestBufferList::of(b.buffers()))
            .collect();
        let mut round = |a: &mut Array, k: u64| {
            for (i, l) in lists.iter_mut().enumerate() {
                let op = if (k + i as u64).is_multiple_of(2) {
                    IoOp::Write { fua: false }
                } else {
                    IoOp::Read
                };
                a.submit(&IoRequest {
                    tag: i as u64,
                    op,
                    offset: ((k * 7 + i as u64 * 13) % 64) * 65536,
                    iov: l.as_buffers(),
                })
                .unwrap();
            }
            let mut n = 0;
            while n < 4 {
                n += a.poll(&mut |_, s| assert_eq!(s, Status::SUCCESS));
            }
        };
        for k in 0..50 {
            round(&mut a, k);
        }
        let warm = a.footprint();
        for k in 50..500 {
            round(&mut a, k);
        }
        assert_eq!(
            a.footprint(),
            warm,
            "{level:?}: something grew after warm-up"
        );
    }
}

/// Time per 4 KiB random read at QD 32, one thread, submit and poll only (no controller):
/// a raid0 of two RAM members against one RAM backend of the same size. A measurement, not
/// a check: `cargo test --release -p volumes -- --ignored --nocapture per_io_cost`.
#[test]
#[ignore = "a measurement"]
fn per_io_cost_of_raid0_against_its_member_kind() {
    fn run(b: &mut dyn Backend, ios: u64) -> f64 {
        let bufs: Vec<IoBuffer> = (0..32).map(|_| IoBuffer::new(4096)).collect();
        let lists: Vec<device_model::backend::GuestBufferList> = bufs
            .iter()
            .map(|x| device_model::backend::GuestBufferList::of(x.buffers()))
            .collect();
        let blocks = b.size() / 4096;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let next = |seed: &mut u64| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed % blocks) * 4096
        };
        let submit = |b: &mut dyn Backend, tag: u64, off: u64| {
            b.submit(&IoRequest {
                tag,
                op: IoOp::Read,
                offset: off,
                iov: lists[tag as usize].as_buffers(),
            })
            .unwrap();
        };
        for t in 0..32 {
            submit(b, t, next(&mut seed));
        }
        let t0 = Instant::now();
        let mut done = 0u64;
        let mut again = Vec::with_capacity(32);
        while done < ios {
            again.clear();
            b.poll(&mut |t, _| again.push(t));
            for &t in &again {
                submit(b, t, next(&mut seed));
            }
            done += again.len() as u64;
        }
        let ns = t0.elapsed().as_nanos() as f64 / done as f64;
        while b.in_flight() > 0 {
            b.poll(&mut |_, _| {});
        }
        ns
    }
    // `PER_IO_ONLY=malloc|raid0|driven` runs that one kind once (for callgrind: instructions
    // per I/O of the submit + poll path alone, `PER_IO_COUNT` I/Os)
    if let Ok(only) = std::env::var("PER_IO_ONLY") {
        let ios = std::env::var("PER_IO_COUNT").map_or(200_000, |v| v.parse().unwrap());
        let mut b: Box<dyn Backend> = match only.as_str() {
            "malloc" => Box::new(MallocBackend::new(1 << 30).unwrap()),
            "raid0" => Box::new(create_twin()),
            _ => Box::new(DrivenArray::new(create_twin())),
        };
        eprintln!("{only}: {:.0} ns/IO", run(b.as_mut(), ios));
        return;
    }
    let ios = 2_000_000;
    let mut malloc = MallocBackend::new(1 << 30).unwrap();
    let members = (0..2)
        .map(|i| MemberIn {
            describe: format!("m{i}"),
            backend: Box::new(MallocBackend::new((512 << 20) + DATA_OFFSET).unwrap()),
        })
        .collect();
    let (mut a, _h) = create("bench", Level::Raid0, DEFAULT_STRIP, members, 0).unwrap();
    let mut driven = DrivenArray::new(create_twin());
    for round in 0..3 {
        let m = run(&mut malloc, ios);
        let r = run(&mut a, ios);
        let d = run(&mut driven, ios);
        eprintln!(
            "round {round}: malloc {m:.0} ns/IO, raid0 {r:.0} ns/IO ({:.2}x IOPS), driven raid0 {d:.0} ns/IO ({:.2}x)",
            m / r,
            m / d
        );
    }
}

fn create_twin() -> Array {
    let members = (0..2)
        .map(|i| MemberIn {
            describe: format!("d{i}"),
            backend: Box::new(MallocBackend::new((512 << 20) + DATA_OFFSET).unwrap()),
        })
        .collect();
    create("bench2", Level::Raid0, DEFAULT_STRIP, members, 0)
        .unwrap()
        .0
}
