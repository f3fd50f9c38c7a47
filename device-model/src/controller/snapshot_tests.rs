//! Kill-point tests of the state journal: a worker that dies at every journal step (before
//! and after each fetch record, head store, posting record, CQE write, CQ tail record, slot
//! release and slow-state save) is replaced by a new controller restored from the same state
//! memfd, and every command the guest submitted is completed exactly once.

use std::collections::BTreeMap;
use std::sync::Arc;

use nvme_spec::Status;

use crate::backend::FileBackend;
use crate::controller::Controller;
use crate::journal::{CRASH_AT, Journal};
use crate::namespace::Namespace;
use crate::test_harness::{DATA, Harness, sqe};

/// The namespace on a file, which outlives a worker as it does in the daemon.
fn namespace(path: &std::path::Path) -> Vec<Namespace> {
    vec![Namespace::new(
        1,
        Box::new(FileBackend::open(path, Some(1 << 20)).unwrap()),
        9,
        "K",
    )]
}

/// A worker died: a new controller maps the same memory, doorbells and state memfd, and
/// restores (the supervisor has replayed the memory map already: the harness's map is kept).
fn replace_worker(h: &mut Harness, state: &sys_util::SharedMemory, file: &std::path::Path) {
    replace_worker_as(h, state, file, Harness::config());
}

/// [`replace_worker`] with a controller configured as `cfg`.
fn replace_worker_as(
    h: &mut Harness,
    state: &sys_util::SharedMemory,
    file: &std::path::Path,
    cfg: crate::ControllerConfig,
) {
    let mut c = Controller::new(
        cfg,
        Arc::clone(&h.mem),
        Arc::clone(&h.doorbells),
        namespace(file),
    );
    c.attach_journal(Journal::open(state.fd().try_clone_to_owned().unwrap()).unwrap());
    // the dead worker's memory is gone without running anything of it (kill -9)
    std::mem::forget(std::mem::replace(&mut h.ctrl, c));
    h.ctrl.restore().unwrap();
    // the doorbells pick up where the host is: with registers only, the CQ heads are the
    // registers (a head taken from anywhere else lets a nearly full CQ be overwritten)
    if !h.ctrl.shadow_doorbells_enabled() {
        for q in [0u16, 1] {
            if let Some(cq) = h.ctrl.queues.cq(q) {
                assert_eq!(cq.head, h.doorbells.load(2 * q as usize + 1), "CQ {q} head");
            }
        }
    }
}

/// A controller keeping its state in a fresh state memfd, its namespace on a fresh file
/// named after `name`: the harness, the memfd (for the next worker) and the file.
fn journalled(name: &str) -> (Harness, sys_util::SharedMemory, std::path::PathBuf) {
    let file = std::env::temp_dir().join(format!("vnvme-{name}-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let state = Journal::create().unwrap();
    let j = Journal::open(state.fd().try_clone_to_owned().unwrap()).unwrap();
    (Harness::with_journal(namespace(&file), j), state, file)
}

/// Run the scenario with the worker dying at journal step `crash_at` (0: never): returns how
/// many times each command was completed and whether the crash point was reached.
fn scenario(crash_at: u64, shadow: bool) -> (BTreeMap<(bool, u16), usize>, bool) {
    let (done, crashes) = scenario_crashing(&[crash_at], shadow);
    (done, crashes > 0)
}

/// What happens once every command completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    /// Nothing: a few more polls.
    Poll,
    /// A planned upgrade (state saved, a new worker restores), then a few more polls.
    Upgrade,
}

/// The scenario with a worker dying at each step of `crashes` in turn (counted from the start
/// of that worker's life; 0: never): the completions, and how many workers died.
fn scenario_crashing(crashes: &[u64], shadow: bool) -> (BTreeMap<(bool, u16), usize>, usize) {
    scenario_then(crashes, shadow, Then::Poll)
}

/// [`scenario_crashing`], and `then` once every command completed.
fn scenario_then(
    crashes: &[u64],
    shadow: bool,
    then: Then,
) -> (BTreeMap<(bool, u16), usize>, usize) {
    let crash_at = crashes.first().copied().unwrap_or(0);
    let (mut h, state, file) = journalled(&format!(
        "killpoint-{crashes:?}-{shadow}-{}",
        then == Then::Upgrade
    ));
    if shadow {
        // Doorbell Buffer Config; the test keeps ringing the admin queue's registers, as
        // Linux does: its shadow copies then stay behind
        let c = h.admin(sqe(0x7c, 0, DATA + 0x20000, &[]));
        let mut s = sqe(0x7c, 0, DATA + 0x20000, &[]);
        s[32..40].copy_from_slice(&(DATA + 0x21000).to_le_bytes());
        let _ = c;
        let c = h.admin(s);
        let got = h.wait(true, 2);
        assert!(
            got.iter().any(|&(id, st)| id == c && st == Status::SUCCESS),
            "{got:?}"
        );
        assert!(h.ctrl.shadow_doorbells_enabled());
        // and the I/O queue pair's doorbells are the shadow copies only, as Linux keeps them
        h.shadow_io = Some(DATA + 0x20000);
    }
    // a lap of the I/O rings but 3 entries first: the commands below cross the end of both
    // rings, so the crashes find the host's CQ head and the controller's tail on either side
    for _ in 0..crate::test_harness::QSIZE - 3 {
        assert_eq!(h.io_run(sqe(0x00, 1, 0, &[])), Status::SUCCESS);
    }
    let mut expected = Vec::new();
    for i in 0..4u32 {
        h.write(DATA + u64::from(i) * 4096, &[i as u8 + 1; 4096]);
        // 8 blocks each, at LBA 8 i
        expected.push((
            false,
            h.io(sqe(0x01, 1, DATA + u64::from(i) * 4096, &[i * 8, 0, 7])),
        ));
    }
    expected.push((false, h.io(sqe(0x00, 1, 0, &[]))));
    // Get Features, Number of Queues: an admin completion with its state saved first
    expected.push((true, h.admin(sqe(0x0a, 0, 0, &[0x07]))));
    CRASH_AT.with(|c| c.set(crash_at));
    let mut done: BTreeMap<(bool, u16), usize> = BTreeMap::new();
    let mut crashed = 0;
    // one poll of each queue, what the guest reaps counted even when the next poll dies; a
    // worker that dies is replaced (and its successor may die in its restore too)
    // true when the worker died in it
    let mut reap_once = |h: &mut Harness, done: &mut BTreeMap<(bool, u16), usize>| -> bool {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for admin in [false, true] {
                for (cid, st) in h.reap(admin) {
                    assert_eq!(st, Status::SUCCESS, "crash at {crash_at}: cid {cid}");
                    *done.entry((admin, cid)).or_default() += 1;
                }
            }
        }));
        if r.is_err() {
            crashed += 1;
            // the next worker dies too, at its own step, before or while it runs again what
            // the last one left
            CRASH_AT.with(|c| c.set(crashes.get(crashed).copied().unwrap_or(0)));
            while std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                replace_worker(h, &state, &file);
            }))
            .is_err()
            {
                crashed += 1;
                CRASH_AT.with(|c| c.set(crashes.get(crashed).copied().unwrap_or(0)));
            }
        }
        r.is_err()
    };
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_micros(50));
        let _ = reap_once(&mut h, &mut done);
        if expected.iter().all(|k| done.contains_key(k)) {
            if then == Then::Upgrade {
                // no command fetched since the restore: the next worker must start from
                // where this one is, not from where the dead one's journal left off
                CRASH_AT.with(|c| c.set(0));
                h.ctrl.save_state();
                replace_worker(&mut h, &state, &file);
            }
            // a few more polls: nothing may be completed twice afterwards (a worker may
            // still die in them: the journal records what the host did after its last
            // completion, e.g. the admin CQ head it wrote)
            // (and the last worker gets as many polls after it started, to post again
            // anything it would)
            let enough = 2 * usize::from(crate::controller::Controller::ADMIN_EVERY);
            let mut since_start = 0;
            for _ in 0..20 * enough {
                since_start = if reap_once(&mut h, &mut done) {
                    0
                } else {
                    since_start + 1
                };
                if since_start == enough {
                    break;
                }
            }
            assert_eq!(since_start, enough, "crashes at {crashes:?}: still dying");
            break;
        }
    }
    CRASH_AT.with(|c| c.set(0));
    for k in &expected {
        assert_eq!(
            done.get(k),
            Some(&1),
            "crashes at steps {crashes:?}: command {k:?} completed {:?} times ({done:?})",
            done.get(k)
        );
    }
    assert_eq!(
        done.len(),
        expected.len(),
        "crashes at {crashes:?}: {done:?}"
    );
    // the data written went through, whichever worker wrote it
    for i in 0..4u32 {
        let read = sqe(0x02, 1, DATA + 0x8000, &[i * 8, 0, 7]);
        assert_eq!(h.io_run(read), Status::SUCCESS);
        let back = h.read(DATA + 0x8000, 4096);
        assert!(
            back.iter().all(|&b| b == i as u8 + 1),
            "crashes at {crashes:?}: write {i} lost"
        );
    }
    let _ = std::fs::remove_file(&file);
    (done, crashed)
}

#[test]
fn every_command_completes_exactly_once_whatever_journal_step_the_worker_dies_at() {
    every_kill_point(false);
}

#[test]
fn every_kill_point_with_shadow_doorbells_configured() {
    every_kill_point(true);
}

fn every_kill_point(shadow: bool) {
    let (_, crashed) = scenario(0, shadow);
    assert!(!crashed);
    let mut step = 1;
    loop {
        let (_, crashed) = scenario(step, shadow);
        if !crashed {
            break; // past the last journal step of the scenario
        }
        step += 1;
        assert!(step < 500, "runaway");
    }
    eprintln!("kill points tried: {}", step - 1);
    assert!(step > 20, "only {} kill points", step - 1);
}

/// A worker dies, and its successor dies too before the commands it runs again complete:
/// every pair of kill points of the first 16 steps (the second counted from the new
/// worker's start), each command still completes exactly once.
#[test]
fn every_pair_of_kill_points_completes_each_command_exactly_once() {
    let mut pairs = 0;
    for shadow in [false, true] {
        for first in 1..=16 {
            for second in 1..=16 {
                let (_, died) = scenario_crashing(&[first, second], shadow);
                pairs += usize::from(died == 2);
            }
        }
    }
    eprintln!("pairs of kill points tried: {pairs}");
    assert!(pairs > 300, "only {pairs} pairs reached both kill points");
}

/// An I/O queue pair deleted and created again with the same base and size starts afresh in
/// the journal too (the save at the deletion's completion drops its records' key, the one
/// at the creation's initialises them): a worker dying right after finds the new queue's
/// position (0), not the last life's, and runs no entry of the old ring.
#[test]
fn a_queue_created_again_starts_afresh_in_the_journal() {
    let (mut h, state, file) = journalled("recreate");
    // some way around the ring: the old life ends at entry 5
    for _ in 0..crate::test_harness::QSIZE + 5 {
        assert_eq!(h.io_run(sqe(0x00, 1, 0, &[])), Status::SUCCESS);
    }
    h.recreate_io_queues();
    replace_worker(&mut h, &state, &file);
    let sq = h.ctrl.queues.sq(1).expect("SQ 1 restored");
    assert_eq!((sq.head, sq.tail), (0, 0), "the new queue's position");
    for i in 0..3 {
        h.write(DATA, &[i + 1; 4096]);
        assert_eq!(
            h.io_run(sqe(0x01, 1, DATA, &[0, 0, 7])),
            Status::SUCCESS,
            "write {i}"
        );
    }
    let _ = std::fs::remove_file(&file);
}

/// A worker dies at any step; its successor runs the commands it left and fetches nothing
/// else; then a planned upgrade. Nothing is completed twice: the successor's restore wrote
/// the SQ head it found (a fetch whose head store was missing) back to the journal, so the
/// worker after it does not fetch that entry again. Without that, the entry ran twice and
/// its completion carried a command id the host had long reused (Linux: "genctr mismatch").
#[test]
fn an_upgrade_after_a_recovery_that_fetched_nothing_runs_no_command_twice() {
    let mut tried = 0;
    for shadow in [false, true] {
        for crash_at in 1..=60 {
            let (_, died) = scenario_then(&[crash_at], shadow, Then::Upgrade);
            tried += usize::from(died > 0);
        }
    }
    assert!(tried > 60, "only {tried} kill points reached");
}

/// A worker that finds garbage in its state memfd (a corrupt file, a foreign version) never
/// panics: an unreadable slow state starts the controller from reset, and hot records with
/// any values are bounded (positions taken modulo the queue size, commands run again are
/// checked as any guest command is).
#[test]
fn a_corrupt_state_memfd_never_panics_the_restore() {
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let file = std::env::temp_dir().join(format!("vnvme-corrupt-{}.img", std::process::id()));
    for round in 0..40 {
        let state = Journal::create().unwrap();
        let j = Journal::open(state.fd().try_clone_to_owned().unwrap()).unwrap();
        let mut h = Harness::with_journal(namespace(&file), j);
        h.io(sqe(0x01, 1, DATA, &[0, 0, 7]));
        let raw = Journal::open(state.fd().try_clone_to_owned().unwrap()).unwrap();
        if round % 2 == 0 {
            // garbage in the hot records of the admin and I/O queues
            for q in 0..3u16 {
                let (a, b) = (next() as u32, next() as u32);
                let seen = |register, shadow, value| crate::shadow_doorbell::DoorbellSeen {
                    register,
                    shadow,
                    value,
                };
                raw.doorbell_seen(q, false, &seen(a, b, a ^ b));
                raw.doorbell_seen(q, true, &seen(b, a, next() as u32));
                raw.cq_moved(q, next() as u32, next() & 1 == 0);
                for s in 0..8u16 {
                    let mut sqe = [0u8; 64];
                    for b in &mut sqe {
                        *b = next() as u8;
                    }
                    raw.fetched(q, s, next() as u32, next() as u32, &sqe);
                    if next() & 1 == 0 {
                        raw.posting(q, s, next() as u32, true, &[next() as u8; 16]);
                    }
                }
            }
        } else {
            // a slow state with a valid checksum and random contents, or cut short
            let len = (next() % 4096) as usize;
            let mut blob: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(v) = blob.get_mut(0..4) {
                v.copy_from_slice(&1u32.to_le_bytes());
            }
            let _ = raw.save_blob(&blob);
        }
        replace_worker(&mut h, &state, &file);
        for _ in 0..20 {
            h.ctrl.poll();
        }
    }
    let _ = std::fs::remove_file(&file);
}

/// QoS limits set at run time go to the journal at the next poll and come back in the next
/// worker, whose polls before its restore do not overwrite the saved state.
#[test]
fn run_time_qos_limits_outlive_the_worker_and_polls_before_restore_write_nothing() {
    let (mut h, state, file) = journalled("qos");
    assert_eq!(h.io_run(sqe(0x00, 1, 0, &[])), Status::SUCCESS);
    let limits = crate::qos::QosLimits {
        iops: Some(12_345),
        bytes_per_sec: Some(67_890_000),
    };
    h.ctrl.qos_control().set(limits);
    h.ctrl.poll();
    // the next worker: its reactor polls before the supervisor asks it to restore
    let mut c = Controller::new(
        Harness::config(),
        Arc::clone(&h.mem),
        Arc::clone(&h.doorbells),
        namespace(&file),
    );
    c.attach_journal(Journal::open(state.fd().try_clone_to_owned().unwrap()).unwrap());
    c.qos_control().set(crate::qos::QosLimits::default());
    for _ in 0..3 {
        c.poll();
    }
    std::mem::forget(std::mem::replace(&mut h.ctrl, c));
    let r = h.ctrl.restore().unwrap();
    assert!(
        r.enabled,
        "the saved state was overwritten before the restore"
    );
    assert_eq!(h.ctrl.qos_control().get(), limits);
    assert_eq!(h.io_run(sqe(0x00, 1, 0, &[])), Status::SUCCESS);
    let _ = std::fs::remove_file(&file);
}

/// The SMART counters and the error log a host reads do not go back at the next worker.
#[test]
fn smart_counters_and_the_error_log_outlive_the_worker() {
    let (mut h, state, file) = journalled("smart");
    h.write(DATA, &[7; 4096]);
    assert_eq!(h.io_run(sqe(0x01, 1, DATA, &[0, 0, 7])), Status::SUCCESS);
    assert_eq!(h.io_run(sqe(0x02, 1, DATA, &[0, 0, 7])), Status::SUCCESS);
    // beyond the namespace's 2,048 blocks: an error log entry
    assert_ne!(h.io_run(sqe(0x02, 1, DATA, &[4096, 0, 0])), Status::SUCCESS);
    let before = (
        h.ctrl.admin.smart.reads,
        h.ctrl.admin.smart.writes,
        h.ctrl.admin.smart.bytes_read,
        h.ctrl.admin.smart.bytes_written,
        h.ctrl.admin.errors.count(),
    );
    assert_eq!(before, (1, 1, 4096, 4096, 1));
    h.ctrl.save_state();
    replace_worker(&mut h, &state, &file);
    let after = (
        h.ctrl.admin.smart.reads,
        h.ctrl.admin.smart.writes,
        h.ctrl.admin.smart.bytes_read,
        h.ctrl.admin.smart.bytes_written,
        h.ctrl.admin.errors.count(),
    );
    assert_eq!(after, before);
    assert_eq!(h.ctrl.admin.errors.entries.len(), 1);
    assert_eq!(h.ctrl.admin.errors.entries[0].error_count.get(), 1);
    let _ = std::fs::remove_file(&file);
}

/// The asynchronous event state outlives a worker killed before the host asked for it: an
/// event raised with no request parked, the types reported and not yet acknowledged, and
/// the Changed Namespace List. The next worker reports each event once.
#[test]
fn asynchronous_events_waiting_for_the_host_outlive_the_worker() {
    use crate::state::async_events::{AsyncEvent, event_type, smart_info};
    use crate::state::changed_namespaces::NS_ATTRIBUTE_CHANGED;
    let spare = AsyncEvent {
        event_type: event_type::SMART,
        info: smart_info::SPARE_BELOW_THRESHOLD,
        log_page: nvme_spec::log_page::lid::SMART_HEALTH,
    };
    let (mut h, state, file) = journalled("aen");
    assert_eq!(h.io_run(sqe(0x00, 1, 0, &[])), Status::SUCCESS);
    // a SMART event reported to a parked request: its type is held back from now on
    let aer = h.admin(sqe(0x0c, 0, 0, &[]));
    h.ctrl.poll();
    let mem = h.ctrl.mem.snapshot();
    h.ctrl.raise_event(spare, &mem);
    assert_eq!(h.admin_wait(aer), Status::SUCCESS);
    // a namespace change with no request parked: the notice waits
    h.ctrl.admin.changed_ns.record(1);
    h.ctrl.raise_event(NS_ATTRIBUTE_CHANGED, &mem);
    assert_eq!(h.ctrl.admin.events.queued.len(), 1);
    // the next poll saves what changed outside an admin command; then kill -9
    h.ctrl.poll();
    replace_worker(&mut h, &state, &file);
    assert_eq!(
        h.ctrl
            .admin
            .events
            .queued
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        [NS_ATTRIBUTE_CHANGED]
    );
    assert_eq!(h.ctrl.admin.changed_ns.nsids, [1]);
    // the SMART event is not reported twice before its log page is read
    let mem = h.ctrl.mem.snapshot();
    h.ctrl.raise_event(spare, &mem);
    assert_eq!(h.ctrl.admin.events.queued.len(), 1, "held back");
    // the next request gets the notice at once
    let aer = h.admin(sqe(0x0c, 0, 0, &[]));
    assert_eq!(h.admin_wait(aer), Status::SUCCESS);
    assert!(h.ctrl.admin.events.queued.is_empty());
    let _ = std::fs::remove_file(&file);
}

/// A subsystem that outlives the worker, as the keeper's journal makes the real one
/// (`sriov::Subsystem::keep_in`): the attachments it made, and the last command's tag saved
/// with the change.
#[derive(Default)]
struct LastingSubsystem {
    made: std::sync::Mutex<u32>,
    last: std::sync::Mutex<Option<crate::CommandTag>>,
}

impl crate::NvmSubsystem for LastingSubsystem {
    fn nqn(&self) -> &'static str {
        "nqn.lasting"
    }
    fn manages_namespaces(&self) -> bool {
        true
    }
    fn namespace(&self, _: u32) -> Option<crate::SubsystemNamespace> {
        None
    }
    fn controllers(&self) -> Vec<u16> {
        vec![1, 2]
    }
    fn attached(&self, _: u32) -> Option<Vec<u16>> {
        None
    }
    fn allocated(&self, _: u32) -> Vec<u32> {
        Vec::new()
    }
    fn max_nsid(&self) -> u32 {
        1
    }
    fn max_namespaces(&self) -> u32 {
        1
    }
    fn capacity(&self) -> (u64, u64) {
        (0, 0)
    }
    fn create(
        &self,
        _: u64,
        _: u8,
        _: bool,
        _: Option<crate::CommandTag>,
    ) -> Result<u32, crate::NsError> {
        Err(crate::NsError::Fixed)
    }
    fn delete(
        &self,
        _: u32,
        _: u16,
        _: Option<crate::CommandTag>,
    ) -> Result<Vec<crate::NamespaceChange>, crate::NsError> {
        Err(crate::NsError::Fixed)
    }
    fn attach(
        &self,
        _: u32,
        ctrls: &[u16],
        _: u16,
        tag: Option<crate::CommandTag>,
    ) -> Result<Vec<crate::NamespaceChange>, crate::NsError> {
        let mut made = self.made.lock().unwrap();
        if *made > 0 {
            return Err(crate::NsError::AlreadyAttached(ctrls[0]));
        }
        *made += 1;
        *self.last.lock().unwrap() = tag;
        Ok(Vec::new())
    }
    fn detach(
        &self,
        _: u32,
        _: &[u16],
        _: u16,
        _: Option<crate::CommandTag>,
    ) -> Result<Vec<crate::NamespaceChange>, crate::NsError> {
        Err(crate::NsError::Fixed)
    }
    fn applied(&self, tag: crate::CommandTag) -> Option<u32> {
        (*self.last.lock().unwrap() == Some(tag)).then_some(0)
    }
}

/// Namespace Attachment, whose change outlives the worker (saved before it is answered): a
/// worker that dies at any journal step, before or after the change, leaves the next one to
/// run the command again, and that run answers as the first would have (success) without
/// attaching twice, or attaches once if the first never got to. The guest sees exactly one
/// completion, a success.
#[test]
fn a_namespace_attachment_is_made_and_answered_once_whatever_step_the_worker_dies_at() {
    let mut crashed_somewhere = false;
    for crash_at in 1..=24 {
        let sub = std::sync::Arc::new(LastingSubsystem::default());
        let cfg = || {
            let mut c = Harness::config();
            c.subsystem =
                Some(std::sync::Arc::clone(&sub) as std::sync::Arc<dyn crate::NvmSubsystem>);
            c.namespace_management = true;
            c
        };
        let (mut h, state, file) = journalled(&format!("attach-killpoint-{crash_at}"));
        h.ctrl.cfg = cfg();
        // the Controller List: one controller, CNTLID 2
        let mut list = [0u8; 4096];
        list[0..2].copy_from_slice(&1u16.to_le_bytes());
        list[2..4].copy_from_slice(&2u16.to_le_bytes());
        h.write(DATA, &list);
        let cid = h.admin(sqe(0x15, 1, DATA, &[0]));
        CRASH_AT.with(|c| c.set(crash_at));
        let mut answers = Vec::new();
        let start = std::time::Instant::now();
        while answers.is_empty() && start.elapsed() < std::time::Duration::from_secs(5) {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.reap(true)));
            if let Ok(got) = r {
                answers.extend(got);
            } else {
                crashed_somewhere = true;
                CRASH_AT.with(|c| c.set(0));
                replace_worker_as(&mut h, &state, &file, cfg());
            }
        }
        CRASH_AT.with(|c| c.set(0));
        for _ in 0..5 {
            answers.extend(h.reap(true));
        }
        assert_eq!(
            answers,
            [(cid, Status::SUCCESS)],
            "crash at step {crash_at}"
        );
        assert_eq!(*sub.made.lock().unwrap(), 1, "crash at step {crash_at}");
        let _ = std::fs::remove_file(&file);
    }
    assert!(crashed_somewhere);
}
