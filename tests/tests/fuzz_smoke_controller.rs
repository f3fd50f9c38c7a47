//! CI smoke run of the `controller_ops` fuzz harness (the whole controller driven through
//! BAR0, doorbells, shadow doorbells, DMA map/unmap and resets under in-flight I/O): a few
//! hand-made op streams that reach resets with requests held by a late backend, then
//! pseudo-random mutations of them. The long runs are `cargo fuzz` (fuzz/README.md).

use vnvme::perf::Rng;
use vnvme_tests::fuzz::{controller_ops, controller_ops_seeds, mutate};

#[test]
fn controller_ops_survive_seeds_and_mutations() {
    let seeds = controller_ops_seeds();
    let under_io: u32 = seeds.iter().map(|s| controller_ops(s)).sum();
    assert!(
        under_io >= 2,
        "seeds reach resets with requests in flight ({under_io})"
    );
    let mut rng = Rng(0x00c0_ffee);
    for round in 0..400 {
        let input = mutate(&mut rng, &seeds[round % seeds.len()], 8, 7);
        let _ = controller_ops(&input);
    }
}

#[test]
#[ignore = "writes the seed corpus for cargo fuzz (fuzz/corpus/controller_ops/)"]
fn write_controller_ops_corpus() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/controller_ops");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, s) in controller_ops_seeds().iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
    }
}
