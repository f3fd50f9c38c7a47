//! Partial granules copied up without waiting in place (`fill.rs`): two 512-byte writes
//! into one granule a clone shares with its snapshot, submitted while the base answers
//! nothing, return at once; once the base answers, both land on the granule's old contents
//! and the snapshot keeps its image.

use device_model::backend::IoOp;
use nvme_spec::Status;

use super::commit::{Pending, completions, submit};
use super::gate::{Hold, MIB, gated_store, patience_ran_out};
use super::io;
use crate::lvol::check;

#[test]
fn partial_writes_to_a_shared_granule_wait_for_their_fill_without_holding_the_caller() {
    let (store, gate, _disk) = gated_store(64 * MIB, Hold::All);
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

    gate.close();
    let before = gate.polls();
    let (b, d) = (vec![0xbbu8; 512], vec![0xddu8; 512]);
    let _w: Vec<Pending> = vec![
        submit(&mut c, 1, IoOp::Write { fua: false }, 512, &b),
        submit(&mut c, 2, IoOp::Write { fua: false }, 2560, &d),
    ];
    assert_eq!(
        gate.polls(),
        before,
        "a partial write waited for the base in place"
    );
    for _ in 0..20 {
        assert_eq!(completions(&mut c), [], "completed with the base silent");
    }
    gate.open();
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
    assert!(!patience_ran_out(&gate), "the base's patience ran out");
    drop((c, s));
    let mut base = store.close().unwrap();
    let report = check(base.as_mut()).unwrap();
    assert!(report.is_clean(), "{:?}", report.errors);
}
