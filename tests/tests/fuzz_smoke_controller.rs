//! CI smoke run of the `controller_ops` fuzz harness (the whole controller driven through
//! BAR0, doorbells, shadow doorbells, DMA map/unmap and resets under in-flight I/O): a few
//! hand-made op streams that reach resets with requests held by a late backend, then
//! pseudo-random mutations of them. The long runs are `cargo fuzz` (fuzz/README.md).

use vnvme::perf::Rng;
use vnvme_tests::fuzz::{controller_ops, controller_ops_seeds};

#[test]
fn controller_ops_survive_seeds_and_mutations() {
    let seeds = controller_ops_seeds();
    let under_io: u32 = seeds.iter().map(|s| controller_ops(s)).sum();
    assert!(
        under_io >= 2,
        "seeds reach resets with requests in flight ({under_io})"
    );
    let mut rng = Rng(0x00c0_ffee);
    let mut runs = 0;
    for round in 0..400 {
        let mut input = seeds[round % seeds.len()].clone();
        for _ in 0..=(rng.next() % 8) {
            let at = (rng.next() as usize) % input.len();
            match rng.next() % 3 {
                0 => input[at] = rng.next() as u8,
                1 => input.insert(at, rng.next() as u8),
                _ => {
                    input.remove(at);
                }
            }
            if input.is_empty() {
                input.push(7);
            }
        }
        let _ = controller_ops(&input);
        runs += 1;
    }
    assert_eq!(runs, 400);
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
