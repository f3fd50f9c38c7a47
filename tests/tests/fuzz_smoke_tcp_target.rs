//! CI smoke run of the `nvme_tcp_target` fuzz harness (the NVMe/TCP target's state machine
//! fed from the network). A panic anywhere aborts this test binary (the harness's panic
//! hook: the target would otherwise contain it to one connection and hide it).

use vnvme::perf::Rng;
use vnvme_tests::fuzz::{mutate, nvme_tcp_target, nvme_tcp_target_seeds};

#[test]
fn nvme_tcp_target_survives_seeds_and_mutations() {
    let _ = env_logger::builder().is_test(true).try_init();
    let seeds = nvme_tcp_target_seeds();
    let answers: Vec<usize> = seeds.iter().map(|s| nvme_tcp_target(s)).collect();
    // ICResp (128) + Connect response (24) + property get/set, Keep Alive and Identify
    // responses (24 each) and Identify data (4096): the seeds are understood, not refused
    assert!(answers[0] >= 128 + 24 * 5 + 4096, "{answers:?}");
    assert!(
        answers[1] > answers[0],
        "the I/O seed gets R2Ts and responses: {answers:?}"
    );
    let mut rng = Rng(0x7c9_0001);
    for round in 0..150 {
        let input = mutate(&mut rng, &seeds[round % seeds.len()], 6, 0);
        let _ = nvme_tcp_target(&input);
    }
}

#[test]
#[ignore = "writes the seed corpus for cargo fuzz (fuzz/corpus/nvme_tcp_target/)"]
fn write_nvme_tcp_target_corpus() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/nvme_tcp_target");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, s) in nvme_tcp_target_seeds().iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
    }
}
