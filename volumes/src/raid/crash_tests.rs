//! Crash consistency of mirrors: seeded random workloads of writes (one request at a time,
//! 512 B to 16 KiB, across region and strip boundaries) and flushes on a raid1 of two disks,
//! and a raid10 of four, with a
//! volatile write cache (`lvol::tests::crash_disk`: unflushed writes dropped, reordered or
//! torn per sector at a crash). Each disk dies after its own random number of writes and
//! flushes (the power goes; one may outlive the other, and the array then retires it), then
//! both crash. The array is assembled from what survived and its resync run; then:
//! - assembly finds it (one member at least is in sync);
//! - every sector reads what the last successful Flush covered or a write issued after it
//!   (never garbage, never older data);
//! - the members in sync hold the same bytes (a write that reached one mirror and not the
//!   other before the crash was found by the bitmap and resynchronized).
//!
//! `RAID_CRASH_CASES` sets the number of cases (default 400), `RAID_CRASH_SEED` the first
//! seed; a failure names its seed.

use device_model::backend::IoOp;
use nvme_spec::Status;

use super::superblock::DATA_OFFSET;
use super::tests::io;
use super::*;
use crate::lvol::tests::crash_disk::CrashDisk;
use crate::lvol::tests::io::Rng;

const MIB: u64 = 1 << 20;
/// Member size: 1 MiB reserved + 8 MiB of data.
const MEMBER: u64 = 9 * MIB;
/// The part of the array the workloads write (several 1 MiB bitmap regions).
const SPAN: u64 = 6 * MIB;
const SECTOR: u64 = 512;

fn members(d: &[CrashDisk]) -> Vec<MemberIn> {
    d.iter()
        .enumerate()
        .map(|(i, x)| MemberIn {
            describe: format!("m{i}"),
            backend: Box::new(x.clone()),
        })
        .collect()
}

/// Sector contents for write `id` (0: the zeroes every case starts from).
fn sector_of(id: u64, sector: u64) -> [u8; SECTOR as usize] {
    let mut b = [0u8; SECTOR as usize];
    if id != 0 {
        for (i, c) in b.chunks_mut(16).enumerate() {
            c[..8].copy_from_slice(&id.to_le_bytes());
            c[8..].copy_from_slice(&(sector ^ i as u64).to_le_bytes());
        }
    }
    b
}

/// Which write a sector's bytes came from, if any.
fn id_of(bytes: &[u8], sector: u64) -> Option<u64> {
    let id = u64::from_le_bytes(bytes[..8].try_into().ok()?);
    (sector_of(id, sector)[..] == *bytes).then_some(id)
}

/// One case on `level` (raid1: two disks; raid10: four): `Err` says what broke, with the
/// seed.
fn case(seed: u64, level: Level) -> Result<(), String> {
    let fail = |what: String| Err(format!("seed {seed} ({}): {what}", level.name()));
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let n = if level == Level::Raid10 { 4 } else { 2 };
    let disks: Vec<CrashDisk> = (0..n)
        .map(|k| CrashDisk::junk(MEMBER as usize, seed * 4 + k))
        .collect();
    let (mut a, _h) = match create("c", level, DEFAULT_STRIP, members(&disks), 0) {
        Ok(x) => x,
        Err(e) => return fail(format!("create: {e}")),
    };
    // a known start: zeroes, flushed
    let zero = vec![0u8; MIB as usize];
    for off in (0..SPAN).step_by(MIB as usize) {
        if io(&mut a, IoOp::Write { fua: false }, off, Some(&zero), MIB).0 != Status::SUCCESS {
            return fail("the first writes failed".into());
        }
    }
    if io(&mut a, IoOp::Flush, 0, None, 0).0 != Status::SUCCESS {
        return fail("the first flush failed".into());
    }
    let sectors = (SPAN / SECTOR) as usize;
    // per sector: what the last successful flush covered, and what was issued since
    let mut flushed = vec![0u64; sectors];
    let mut since: Vec<Vec<u64>> = vec![Vec::new(); sectors];
    let mut latest = vec![0u64; sectors];
    for d in &disks {
        d.die_after(rng.below(120));
    }
    let mut id = 0;
    for _ in 0..200 {
        if rng.chance(12) {
            if io(&mut a, IoOp::Flush, 0, None, 0).0 != Status::SUCCESS {
                break;
            }
            flushed.clone_from(&latest);
            since.iter_mut().for_each(Vec::clear);
            continue;
        }
        id += 1;
        let n = 1 + rng.below(32);
        let first = rng.below(SPAN / SECTOR - n);
        let mut data = Vec::with_capacity((n * SECTOR) as usize);
        for s in first..first + n {
            data.extend_from_slice(&sector_of(id, s));
            // issued: it may land whatever its status says
            since[s as usize].push(id);
        }
        let st = io(
            &mut a,
            IoOp::Write { fua: false },
            first * SECTOR,
            Some(&data),
            n * SECTOR,
        )
        .0;
        if st != Status::SUCCESS {
            break;
        }
        for s in first..first + n {
            latest[s as usize] = id;
        }
    }
    // the power is gone: nothing more reaches the disks (the array's clean stop as it is
    // dropped fails on them)
    for d in &disks {
        d.die_after(0);
    }
    drop(a);
    let keep = rng.below(101);
    let after: Vec<CrashDisk> = disks
        .iter()
        .map(|d| CrashDisk::new(d.crash_image(&mut rng, keep)))
        .collect();
    let got = match assemble(Some("c"), members(&after), 0) {
        Ok(g) => g,
        Err(e) => return fail(format!("assembly after the crash: {e}")),
    };
    let mut a = got.array;
    if !a.poll_until(std::time::Duration::from_secs(20), |a| {
        a.idle() && a.queued.is_empty() && !a.meta_busy()
    }) {
        return fail("the resync never finished".into());
    }
    let (st, bytes) = io(&mut a, IoOp::Read, 0, None, SPAN);
    if st != Status::SUCCESS {
        return fail(format!("the read after the resync failed: {st:?}"));
    }
    for (s, chunk) in bytes.chunks(SECTOR as usize).enumerate() {
        let got = id_of(chunk, s as u64);
        let ok = got.is_some_and(|g| g == flushed[s] || since[s].contains(&g));
        if !ok {
            return fail(format!(
                "sector {s} holds {got:?}: flushed {}, issued since {:?}",
                flushed[s], since[s]
            ));
        }
    }
    // in each leg, the members the array runs on hold the same bytes
    let status = a.status();
    for leg in 0..a.layout.legs() {
        let active: Vec<usize> = a
            .layout
            .slots(leg)
            .filter(|&i| status.members[i].state == "active")
            .collect();
        if active.is_empty() {
            return fail(format!("no member of leg {leg} in sync: {:?}", got.refused));
        }
        let images: Vec<Vec<u8>> = active
            .iter()
            .map(|&i| {
                let mut d = after[status.members[i].slot].clone();
                io(&mut d, IoOp::Read, DATA_OFFSET, None, MEMBER - DATA_OFFSET).1
            })
            .collect();
        if images.windows(2).any(|w| w[0] != w[1]) {
            return fail(format!("the mirrors of leg {leg} differ after the resync"));
        }
    }
    Ok(())
}

/// Cases from `RAID_CRASH_SEED` (default 1), `RAID_CRASH_CASES` of them (default `dflt`).
fn run(level: Level, dflt: u64) {
    let cases: u64 = std::env::var("RAID_CRASH_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(dflt);
    let first: u64 = std::env::var("RAID_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let failures: Vec<String> = (first..first + cases)
        .filter_map(|s| case(s, level).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed, first: {}",
        failures.len(),
        failures[0]
    );
}

#[test]
fn mirrors_keep_flushed_data_and_agree_after_every_crash() {
    run(Level::Raid1, 400);
}

#[test]
fn striped_mirrors_keep_flushed_data_and_agree_after_every_crash() {
    run(Level::Raid10, 200);
}
