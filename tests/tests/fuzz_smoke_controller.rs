//! CI smoke run of the `controller_ops` fuzz harness (the whole controller driven through
//! BAR0, doorbells, shadow doorbells, DMA map/unmap and resets under in-flight I/O): a few
//! hand-made op streams that reach resets with requests held by a late backend, then
//! pseudo-random mutations of them. The long runs are `cargo fuzz` (fuzz/README.md).

use vnvme::perf::Rng;
use vnvme_tests::fuzz::controller_ops;

/// Hand-made op streams (see `controller_ops` for the op bytes).
fn seeds() -> Vec<Vec<u8>> {
    let enable = vec![7, 3, 7];
    // reads and writes in flight (late backend), then each kind of teardown under them
    let io: Vec<u8> = (0..8u8).flat_map(|i| [9, i, i & 1, i]).collect();
    let mut out = Vec::new();
    for teardown in [
        vec![5, 0],                            // device reset
        vec![5, 1],                            // controller reset
        vec![4, 0, 3, 7],                      // DMA unmap of the queue memory, polls
        vec![4, 3, 5, 1, 3, 7],                // client forgets all memory, reset
        vec![0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0], // CC = 0 through the register
        vec![6, 0xff, 0xff],                   // Keep Alive check far in the future
    ] {
        let mut s = enable.clone();
        s.extend_from_slice(&io);
        s.push(3);
        s.push(1);
        s.extend_from_slice(&teardown);
        s.extend_from_slice(&[3, 7, 7, 3, 7]);
        out.push(s);
    }
    // Keep Alive Timeout FFFFFFFFh through Set Features, then a check
    let mut ka = enable.clone();
    let mut set_features = vec![2, 2, 0, 0x09];
    set_features.extend_from_slice(&[0; 39]);
    set_features.extend_from_slice(&[0x0f, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    set_features.extend_from_slice(&[0; 16]);
    ka.extend_from_slice(&set_features);
    ka.extend_from_slice(&[1, 0, 3, 0, 3, 7, 6, 0x10, 0x00]);
    out.push(ka);
    // shadow doorbells configured, then garbage shadow values
    let mut sh = enable;
    sh.extend_from_slice(&[10, 3, 7, 8, 0, 0xff, 0xff, 8, 1, 0x40, 0, 9, 1, 0, 1, 3, 7]);
    out.push(sh);
    out
}

#[test]
fn controller_ops_survive_seeds_and_mutations() {
    let seeds = seeds();
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
