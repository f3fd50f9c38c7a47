//! The fuzz harnesses on stable, in CI: pseudo-random and mutated-valid inputs, plus every
//! input saved under `fuzz/regressions/<target>/` (hand-written inputs described in each
//! folder's README, and crashes found by `cargo fuzz`, kept so they stay fixed). A missing
//! or empty folder fails its test. The real fuzzing runs by hand: see `fuzz/README.md`.

use std::path::Path;

// deterministic, so a failure here reproduces
use vnvme::perf::Rng;
use vnvme_tests::fuzz;

/// Feed every input saved under `fuzz/regressions/<target>/` (its README aside) to
/// `harness`, in name order; returns how many. A missing folder, or one that cannot be
/// read, fails the test: a replay of nothing would check nothing.
fn replay(target: &str, harness: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}: {target}'s regression inputs", dir.display()));
    let mut inputs: Vec<_> = entries
        .map(|e| {
            e.unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .path()
        })
        .filter(|p| p.extension().is_none_or(|x| x != "md"))
        .collect();
    inputs.sort();
    for path in &inputs {
        let input = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // shown with the panic message if this input fails
        eprintln!("replaying {}", path.display());
        harness(&input);
    }
    inputs.len()
}

/// [`replay`], asserting that the folder held at least one input.
fn replay_some(target: &str, harness: fn(&[u8])) {
    let n = replay(target, harness);
    assert!(n > 0, "no regression input in fuzz/regressions/{target}/");
}

#[test]
fn vfio_user_message_parser_survives_garbage() {
    let mut rng = Rng(0x5eed_0001);
    replay_some("vfio_user_message", fuzz::vfio_user_message);
    for _ in 0..20_000 {
        let mut msg = rng.bytes(96);
        // half the time a plausible header: a real command number and a matching size
        if msg.len() >= 17 && rng.next().is_multiple_of(2) {
            let cmd = (rng.next() % 14) as u16;
            msg[3..5].copy_from_slice(&cmd.to_le_bytes());
            let size = (msg.len() - 1) as u32;
            msg[5..9].copy_from_slice(&size.to_le_bytes());
            msg[9..13].copy_from_slice(&0u32.to_le_bytes());
        }
        fuzz::vfio_user_message(&msg);
    }
}

#[test]
fn nvme_command_handling_survives_garbage() {
    let mut rng = Rng(0x5eed_0002);
    replay_some("nvme_commands", fuzz::nvme_commands);
    let opcodes = [
        0x00u8, 0x01, 0x02, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0a, 0x0c, 0x0d, 0x15, 0x18, 0x1c, 0x7c,
        0x80,
    ];
    for round in 0..2000 {
        let mut input = rng.bytes(64 * 12 + 3);
        // make most commands plausible: a known opcode, nsid 1, PRPs inside guest memory
        for cmd in input.get_mut(3..).unwrap_or_default().chunks_mut(64) {
            if cmd.len() == 64 && !rng.next().is_multiple_of(4) {
                cmd[0] = if round % 2 == 0 {
                    opcodes[(rng.next() as usize) % opcodes.len()]
                } else {
                    (rng.next() % 10) as u8
                };
                cmd[1] &= 0xc0; // PSDT random, no fuse
                cmd[4..8].copy_from_slice(&1u32.to_le_bytes());
                let prp = (rng.next() % (1 << 20)) & !3;
                cmd[24..32].copy_from_slice(&prp.to_le_bytes());
                cmd[44..48].copy_from_slice(&0u32.to_le_bytes()); // SLBA high
                cmd[48..52].copy_from_slice(&((rng.next() % 64) as u32).to_le_bytes()); // NLB
            }
        }
        fuzz::nvme_commands(&input);
    }
}

#[test]
fn nvme_tcp_pdu_decoder_survives_garbage() {
    let mut rng = Rng(0x5eed_0003);
    replay_some("nvme_tcp_pdu", fuzz::nvme_tcp_pdu);
    // valid PDUs of every type in every mode, then mutated: one to four bytes changed, or
    // truncated, or replaced by noise
    let seeds = fuzz::nvme_tcp_pdu_seeds();
    for seed in &seeds {
        fuzz::nvme_tcp_pdu(seed);
    }
    for i in 0..40_000u32 {
        let mut input = seeds[i as usize % seeds.len()].clone();
        match rng.next() % 3 {
            0 => {
                for _ in 0..=rng.next() % 4 {
                    let at = 1 + (rng.next() as usize) % (input.len() - 1);
                    input[at] = rng.next() as u8;
                }
            }
            1 => input.truncate(1 + (rng.next() as usize) % (input.len() - 1)),
            _ => input = rng.bytes(200),
        }
        fuzz::nvme_tcp_pdu(&input);
    }
}

#[test]
fn rdma_capsule_parser_survives_garbage() {
    let mut rng = Rng(0x5eed_0021);
    replay_some("rdma_capsule", fuzz::rdma_capsule);
    let seeds = fuzz::rdma_capsule_seeds();
    for seed in &seeds {
        fuzz::rdma_capsule(seed);
    }
    for i in 0..40_000u32 {
        let mut input = seeds[i as usize % seeds.len()].clone();
        match rng.next() % 3 {
            0 => {
                for _ in 0..=rng.next() % 4 {
                    let at = 1 + (rng.next() as usize) % (input.len() - 1);
                    input[at] = rng.next() as u8;
                }
            }
            1 => input.truncate(1 + (rng.next() as usize) % (input.len() - 1)),
            _ => input = rng.bytes(200),
        }
        fuzz::rdma_capsule(&input);
    }
}

#[test]
fn rpc_requests_survive_garbage() {
    let mut rng = Rng(0x5eed_0004);
    replay_some("rpc_request", fuzz::rpc_request);
    let seeds = fuzz::rpc_request_seeds();
    for seed in &seeds {
        fuzz::rpc_request(seed);
    }
    // mutated seeds: bytes changed, truncated, or noise
    for i in 0..3000u32 {
        let mut input = seeds[i as usize % seeds.len()].clone();
        match rng.next() % 3 {
            0 => {
                for _ in 0..=rng.next() % 4 {
                    let at = (rng.next() as usize) % input.len();
                    input[at] = rng.next() as u8;
                }
            }
            1 => input.truncate((rng.next() as usize) % input.len()),
            _ => input = rng.bytes(100),
        }
        fuzz::rpc_request(&input);
    }
    // the harness's daemon leaves no socket directory behind
    let dir = std::env::temp_dir().join(format!("vnvme-fuzz-rpc-{}", std::process::id()));
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// Writes the valid-PDU seeds as the libFuzzer corpus of `nvme_tcp_pdu` (see
/// fuzz/README.md): `cargo test -p vnvme-tests --test fuzz_smoke -- --ignored`.
#[test]
#[ignore = "writes fuzz/corpus; run by hand before fuzzing"]
fn write_nvme_tcp_pdu_seed_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/nvme_tcp_pdu");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, s) in fuzz::nvme_tcp_pdu_seeds().iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:03}")), s).unwrap();
    }
}

#[test]
fn member_metadata_decoders_survive_garbage() {
    let mut rng = Rng(0x5eed_0022);
    replay_some("member_metadata", fuzz::member_metadata);
    let seeds = fuzz::member_metadata_seeds();
    for seed in &seeds {
        fuzz::member_metadata(seed);
    }
    for i in 0..20_000u32 {
        let mut input = seeds[i as usize % seeds.len()].clone();
        match rng.next() % 3 {
            0 => {
                for _ in 0..=rng.next() % 6 {
                    let at = 1 + (rng.next() as usize) % (input.len() - 1);
                    input[at] = rng.next() as u8;
                }
            }
            1 => input.truncate(1 + (rng.next() as usize) % (input.len() - 1)),
            _ => {
                input = [&input[..1], &rng.bytes(600)[..]].concat();
            }
        }
        fuzz::member_metadata(&input);
    }
}

/// `fuzz/regressions/member_metadata/`: the seeds, written once (run with --ignored).
#[test]
#[ignore = "writes the seed corpus"]
fn write_member_metadata_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/member_metadata");
    std::fs::create_dir_all(&dir).unwrap();
    let names = [
        "raid-superblock-v2",
        "lvol-superblock",
        "lvol-records",
        "lvol-checkpoint",
    ];
    for (name, seed) in names.iter().zip(fuzz::member_metadata_seeds()) {
        std::fs::write(dir.join(name), seed).unwrap();
    }
}
