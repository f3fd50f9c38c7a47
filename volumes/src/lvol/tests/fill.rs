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

/// An entry at the layer limit is collapsed by fills too: a 4 KiB write to a cluster that
/// four snapshots share in four layers gets a fifth, exclusive layer and returns at once
/// with the base silent; when the base answers, every granule the top lacked is copied up
/// (a run per layer below), the entry becomes one full cluster, and the volume and every
/// snapshot read what they held.
#[test]
fn a_write_to_an_entry_at_the_layer_limit_collapses_it_without_holding_the_caller() {
    use crate::lvol::map::{Entry, MAX_LAYERS};
    let (store, gate, _disk) = gated_store(64 * MIB, Hold::All);
    store.create("v", 4 * MIB, true).unwrap();
    let pattern = |k: u8| vec![0x11u8.wrapping_mul(k + 1); 4096];
    let mut v = store.open("v").unwrap();
    let st = io::run(
        &mut v,
        IoOp::Write { fua: false },
        0,
        Some(&pattern(0)),
        4096,
    )
    .0;
    assert_eq!(st, Status::SUCCESS);
    for k in 1..MAX_LAYERS as u8 {
        store.snapshot("v", &format!("s{k}")).unwrap();
        let off = u64::from(k) * 8192;
        let st = io::run(
            &mut v,
            IoOp::Write { fua: false },
            off,
            Some(&pattern(k)),
            4096,
        )
        .0;
        assert_eq!(st, Status::SUCCESS);
    }
    let layers = |store: &crate::lvol::Store| {
        let c = store.core();
        let id = c.id_of("v").unwrap();
        match &c.meta.volumes[&id].map[0] {
            Entry::Layered(ls) => ls.len(),
            Entry::Full(_) => 1,
            Entry::Unmapped => 0,
        }
    };
    assert_eq!(layers(&store), MAX_LAYERS, "the entry is at the limit");
    store.snapshot("v", "last").unwrap();

    gate.close();
    let before = gate.polls();
    let last = MAX_LAYERS as u8;
    let _w = submit(
        &mut v,
        9,
        IoOp::Write { fua: false },
        u64::from(last) * 8192,
        &pattern(last),
    );
    assert_eq!(
        gate.polls(),
        before,
        "the collapse waited for the base in place"
    );
    for _ in 0..20 {
        assert_eq!(completions(&mut v), [], "completed with the base silent");
    }
    gate.open();
    let t = std::time::Instant::now();
    let mut got = Vec::new();
    while got.is_empty() {
        assert!(t.elapsed().as_secs() < 10, "the write never completed");
        got = completions(&mut v);
    }
    assert_eq!(got, [(9, Status::SUCCESS)]);
    assert_eq!(layers(&store), 1, "collapsed into one full cluster");
    for k in 0..=last {
        let (st, data) = io::read(&mut v, u64::from(k) * 8192, 4096);
        assert_eq!(
            (st, data),
            (Status::SUCCESS, pattern(k)),
            "granule {k} of v"
        );
    }
    assert_eq!(
        io::read(&mut v, 4096, 4096).1,
        vec![0; 4096],
        "never written"
    );
    // each snapshot sees the writes before it
    for k in 1..=last {
        let name = if k == last {
            "last".to_string()
        } else {
            format!("s{k}")
        };
        let mut s = store.open(&name).unwrap();
        for j in 0..=last {
            let want = if j < k { pattern(j) } else { vec![0; 4096] };
            assert_eq!(
                io::read(&mut s, u64::from(j) * 8192, 4096).1,
                want,
                "{name}, granule {j}"
            );
        }
    }
    assert!(!patience_ran_out(&gate), "the base's patience ran out");
    drop(v);
    let mut base = store.close().unwrap();
    let report = check(base.as_mut()).unwrap();
    assert!(report.is_clean(), "{:?}", report.errors);
}
