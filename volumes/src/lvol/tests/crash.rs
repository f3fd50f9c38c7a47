//! Crash consistency: seeded random workloads (create, write, FUA write, read, flush,
//! zero/deallocate, snapshot, clone, delete, resize, rename, inflate, decouple) on a
//! store over a [`CrashDisk`] that dies after a random number of writes and flushes,
//! then loses, reorders and tears what was not flushed. After each crash the image must
//! pass the checker, load, and every volume must read back, per 512-byte sector, its
//! last flushed (or FUA) value or a value written since: never anything else. Each case
//! crashes twice (the second time after a load).
//!
//! `LVOL_CRASH_CASES` sets the number of cases (default 1500), `LVOL_CRASH_SEED` the
//! first seed; a failure names its seed, which replays it alone.

use std::collections::{BTreeMap, HashMap};

use device_model::backend::IoOp;
use nvme_spec::Status;

use super::crash_disk::CrashDisk;
use super::io::{self, Rng};
use crate::lvol::{Faults, LvolBackend, Store, StoreOptions, check};

const SECTOR: u64 = 512;
const CLUSTER: u64 = 16 << 10;
const DISK: usize = 2 << 20;

/// Per-sector history of one volume.
#[derive(Clone, Debug)]
struct VolModel {
    snapshot: bool,
    /// What a read returns now.
    cur: Vec<u64>,
    /// Survives a crash for sure.
    durable: Vec<u64>,
    /// Written since the last flush (may or may not survive).
    since: Vec<Vec<u64>>,
}

impl VolModel {
    fn new(size: u64, snapshot: bool) -> Self {
        let n = (size / SECTOR) as usize;
        Self {
            snapshot,
            cur: vec![0; n],
            durable: vec![0; n],
            since: vec![Vec::new(); n],
        }
    }
    fn size(&self) -> u64 {
        self.cur.len() as u64 * SECTOR
    }
    fn resize(&mut self, size: u64) {
        let n = (size / SECTOR) as usize;
        self.cur.resize(n, 0);
        self.durable.resize(n, 0);
        self.since.resize(n, Vec::new());
    }
}

#[derive(Clone, Debug, Default)]
struct Model {
    vols: BTreeMap<String, VolModel>,
}

impl Model {
    fn flush_all(&mut self) {
        for v in self.vols.values_mut() {
            v.durable.clone_from(&v.cur);
            for s in &mut v.since {
                s.clear();
            }
        }
    }
    fn write(&mut self, name: &str, s0: usize, n: usize, tag: u64, durable: bool) {
        let v = self.vols.get_mut(name).expect("model volume");
        for s in s0..s0 + n {
            v.cur[s] = tag;
            if durable {
                v.durable[s] = tag;
                v.since[s].clear();
            } else {
                v.since[s].push(tag);
            }
        }
    }
    fn shape(&self) -> Vec<(String, u64, bool)> {
        self.vols
            .iter()
            .map(|(k, v)| (k.clone(), v.size(), v.snapshot))
            .collect()
    }
}

/// The 512 bytes sector `s` holds after write `tag` (0: zeroes).
fn sector(tag: u64, s: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    if tag == 0 {
        return b;
    }
    b[..8].copy_from_slice(&tag.to_le_bytes());
    b[8..16].copy_from_slice(&s.to_le_bytes());
    let mut x = tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ s;
    for c in b[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    b
}

/// Which write a sector holds (None: neither zeroes nor any write: garbage).
fn decode(data: &[u8], s: u64) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&data[..8]);
    let tag = u64::from_le_bytes(t);
    (tag != 0 && data == sector(tag, s)).then_some(tag)
}

fn data_for(tag: u64, s0: u64, n: u64) -> Vec<u8> {
    (s0..s0 + n).flat_map(|s| sector(tag, s)).collect()
}

/// What a failed step leaves in doubt.
enum Doubt {
    None,
    /// A write that was not acknowledged.
    Write {
        name: String,
        s0: usize,
        n: usize,
        tag: u64,
    },
    /// A management change that may or may not have become durable: the model after it.
    Change(Model),
}

struct Case {
    rng: Rng,
    disk: CrashDisk,
    store: Store,
    model: Model,
    handles: HashMap<String, LvolBackend>,
    next_tag: u64,
    next_name: u32,
    stats: Stats,
}

#[derive(Default, Debug, Clone, Copy)]
struct Stats {
    steps: u64,
    full: u64,
    crashes: u64,
}

fn err<T>(seed: u64, what: impl std::fmt::Display) -> Result<T, String> {
    Err(format!("seed {seed}: {what}"))
}

impl Case {
    fn handle(&mut self, name: &str) -> &mut LvolBackend {
        if !self.handles.contains_key(name) {
            let h = self.store.open(name).expect("open a model volume");
            self.handles.insert(name.into(), h);
        }
        self.handles.get_mut(name).expect("just opened")
    }

    fn pick(&mut self, writable: bool) -> Option<String> {
        let names: Vec<&String> = self
            .model
            .vols
            .iter()
            .filter(|(_, v)| !writable || !v.snapshot)
            .map(|(k, _)| k)
            .collect();
        if names.is_empty() {
            return None;
        }
        Some(names[self.rng.below(names.len() as u64) as usize].clone())
    }

    fn fresh_name(&mut self, prefix: &str) -> String {
        self.next_name += 1;
        format!("{prefix}{}", self.next_name)
    }

    /// Read volume `name` whole and check every sector against `ok(s)`.
    fn verify(&mut self, seed: u64, name: &str, exact: bool) -> Result<Vec<u64>, String> {
        let v = self.model.vols[name].clone();
        let size = v.size();
        let (st, data) = io::read(self.handle(name), 0, size);
        if st != Status::SUCCESS {
            return err(seed, format!("read of {name} failed: {st:?}"));
        }
        let mut seen = Vec::with_capacity(v.cur.len());
        for (s, chunk) in data.chunks(SECTOR as usize).enumerate() {
            let got = decode(chunk, s as u64);
            let ok = match got {
                None => false,
                Some(t) if exact => t == v.cur[s],
                Some(t) => t == v.durable[s] || v.since[s].contains(&t),
            };
            if !ok {
                return err(
                    seed,
                    format!(
                        "{name} sector {s}: holds {got:?}; expected {} (durable {}, since {:?})",
                        v.cur[s], v.durable[s], v.since[s]
                    ),
                );
            }
            seen.push(got.unwrap_or(0));
        }
        Ok(seen)
    }

    /// One random step; `Err(doubt)` when the disk died under it.
    fn step(&mut self, seed: u64) -> Result<Result<(), Doubt>, String> {
        self.stats.steps += 1;
        let roll = self.rng.below(100);
        if trace() {
            eprintln!("step roll {roll} model {:?}", self.model.shape());
        }
        let dead = |c: &Case| c.disk.dead();
        match roll {
            0..=39 => {
                let Some(name) = self.pick(true) else {
                    return Ok(Ok(()));
                };
                let size = self.model.vols[&name].size();
                let secs = size / SECTOR;
                let aligned = self.rng.chance(80);
                let mut s0 = self.rng.below(secs);
                if aligned {
                    s0 &= !7;
                }
                let max = (secs - s0).min(if self.rng.chance(20) { 96 } else { 24 });
                let mut n = 1 + self.rng.below(max);
                if aligned {
                    n = n.div_ceil(8) * 8;
                    n = n.min(secs - s0);
                }
                self.next_tag += 1;
                let tag = self.next_tag;
                let fua = self.rng.chance(10);
                let data = data_for(tag, s0, n);
                let st = io::run(
                    self.handle(&name),
                    IoOp::Write { fua },
                    s0 * SECTOR,
                    Some(&data),
                    n * SECTOR,
                )
                .0;
                if trace() {
                    eprintln!("write {name} {s0}+{n} tag {tag} fua {fua}: {st:?}");
                }
                if st == Status::SUCCESS {
                    self.model.write(&name, s0 as usize, n as usize, tag, fua);
                } else if st == Status::CAPACITY_EXCEEDED {
                    self.stats.full += 1;
                } else if dead(self) {
                    return Ok(Err(Doubt::Write {
                        name,
                        s0: s0 as usize,
                        n: n as usize,
                        tag,
                    }));
                } else {
                    return err(seed, format!("write to {name} failed: {st:?}"));
                }
            }
            40..=49 => {
                let Some(name) = self.pick(false) else {
                    return Ok(Ok(()));
                };
                self.verify(seed, &name, true)?;
            }
            50..=57 => {
                let Some(name) = self.pick(false) else {
                    return Ok(Ok(()));
                };
                let st = io::flush(self.handle(&name));
                if trace() {
                    eprintln!("flush: {st:?}");
                }
                if st == Status::SUCCESS {
                    self.model.flush_all();
                } else if dead(self) {
                    return Ok(Err(Doubt::None));
                } else {
                    return err(seed, format!("flush failed: {st:?}"));
                }
            }
            58..=64 => {
                let Some(name) = self.pick(true) else {
                    return Ok(Ok(()));
                };
                let secs = self.model.vols[&name].size() / SECTOR;
                let s0 = self.rng.below(secs) & !7;
                let n = (1 + self.rng.below(secs - s0))
                    .div_ceil(8)
                    .min((secs - s0) / 8 * 8)
                    .max(8)
                    .min(secs - s0);
                let op = if self.rng.chance(50) {
                    IoOp::Deallocate { len: n * SECTOR }
                } else {
                    IoOp::WriteZeroes { len: n * SECTOR }
                };
                let st = io::run(self.handle(&name), op, s0 * SECTOR, None, 0).0;
                if trace() {
                    eprintln!("zero {name} {s0}+{n} {op:?}: {st:?}");
                }
                if st == Status::SUCCESS {
                    self.model.write(&name, s0 as usize, n as usize, 0, false);
                } else if st == Status::CAPACITY_EXCEEDED {
                    self.stats.full += 1;
                } else if dead(self) {
                    return Ok(Err(Doubt::Write {
                        name,
                        s0: s0 as usize,
                        n: n as usize,
                        tag: 0,
                    }));
                } else {
                    return err(seed, format!("zeroing {name} failed: {st:?}"));
                }
            }
            _ => return self.manage(seed, roll),
        }
        Ok(Ok(()))
    }

    /// A management step: its model change is applied on success, kept as the doubt when
    /// the disk died under it.
    fn manage(&mut self, seed: u64, roll: u64) -> Result<Result<(), Doubt>, String> {
        let mut after = self.model.clone();
        let res = match roll {
            65..=71 => {
                let name = self.fresh_name("v");
                let size =
                    (1 + self.rng.below(16)) * CLUSTER - if self.rng.chance(20) { 4096 } else { 0 };
                let thin = self.rng.chance(70);
                after.vols.insert(name.clone(), VolModel::new(size, false));
                self.store.create(&name, size, thin)
            }
            72..=77 => {
                let Some(src) = self.pick(true) else {
                    return Ok(Ok(()));
                };
                let name = self.fresh_name("s");
                let mut m = after.vols[&src].clone();
                m.snapshot = true;
                after.vols.insert(name.clone(), m);
                self.store.snapshot(&src, &name)
            }
            78..=82 => {
                let snaps: Vec<String> = self
                    .model
                    .vols
                    .iter()
                    .filter(|(_, v)| v.snapshot)
                    .map(|(k, _)| k.clone())
                    .collect();
                if snaps.is_empty() {
                    return Ok(Ok(()));
                }
                let snap = snaps[self.rng.below(snaps.len() as u64) as usize].clone();
                let name = self.fresh_name("c");
                let mut m = after.vols[&snap].clone();
                m.snapshot = false;
                after.vols.insert(name.clone(), m);
                self.store.clone_snapshot(&snap, &name)
            }
            83..=89 => {
                let Some(name) = self.pick(false) else {
                    return Ok(Ok(()));
                };
                self.handles.remove(&name);
                after.vols.remove(&name);
                self.store.delete(&name)
            }
            90..=93 => {
                let Some(name) = self.pick(true) else {
                    return Ok(Ok(()));
                };
                self.handles.remove(&name);
                let size =
                    (1 + self.rng.below(16)) * CLUSTER - if self.rng.chance(20) { 4096 } else { 0 };
                after.vols.get_mut(&name).expect("model").resize(size);
                self.store.resize(&name, size)
            }
            94..=95 => {
                let Some(name) = self.pick(false) else {
                    return Ok(Ok(()));
                };
                self.handles.remove(&name);
                let new = self.fresh_name("r");
                let m = after.vols.remove(&name).expect("model");
                after.vols.insert(new.clone(), m);
                self.store.rename(&name, &new)
            }
            _ => {
                let Some(name) = self.pick(true) else {
                    return Ok(Ok(()));
                };
                if self.rng.chance(50) {
                    self.store.inflate(&name)
                } else {
                    self.store.decouple(&name)
                }
            }
        };
        if trace() {
            eprintln!("manage {roll}: {res:?} -> {:?}", after.shape());
        }
        match res {
            Ok(()) => {
                self.model = after;
                self.model.flush_all();
                Ok(Ok(()))
            }
            Err(_) if self.disk.dead() => Ok(Err(Doubt::Change(after))),
            Err(crate::lvol::LvolError::NoSpace(_)) => {
                self.stats.full += 1;
                Ok(Ok(()))
            }
            Err(e) => err(seed, format!("management step {roll} failed: {e}")),
        }
    }

    /// Crash now: take the image, check it, load it, verify every volume; continue on it.
    fn crash(&mut self, seed: u64, doubt: Doubt) -> Result<(), String> {
        self.stats.crashes += 1;
        if trace() {
            eprintln!("crash");
        }
        self.handles.clear();
        let keep = [0, 30, 70, 100][self.rng.below(4) as usize];
        let img = self.disk.crash_image(&mut self.rng, keep);
        let mut probe = CrashDisk::new(img.clone());
        match check(&mut probe) {
            Ok(r) if r.is_clean() => {}
            Ok(r) => return err(seed, format!("check after a crash: {:?}", r.errors)),
            Err(e) => {
                return err(
                    seed,
                    format!("check after a crash: the store does not load: {e}"),
                );
            }
        }
        let disk = CrashDisk::new(img);
        let (store, _) = match Store::load(Box::new(disk.clone())) {
            Ok(s) => s,
            Err(e) => return err(seed, format!("load after a crash: {e}")),
        };
        self.disk = disk;
        self.store = store;
        let shape: Vec<(String, u64, bool)> = self
            .store
            .list()
            .into_iter()
            .map(|v| (v.name, v.size, v.snapshot))
            .collect();
        match doubt {
            Doubt::None => {}
            Doubt::Write { name, s0, n, tag } => {
                if let Some(v) = self.model.vols.get_mut(&name) {
                    for s in s0..s0 + n {
                        v.since[s].push(tag);
                    }
                }
            }
            Doubt::Change(after) => {
                if shape == after.shape() && shape != self.model.shape() {
                    self.model = after;
                }
            }
        }
        if shape != self.model.shape() {
            return err(
                seed,
                format!(
                    "volumes after a crash: {shape:?}, expected {:?}",
                    self.model.shape()
                ),
            );
        }
        // every volume reads what the model allows; from now on that is exact
        let names: Vec<String> = self.model.vols.keys().cloned().collect();
        for name in names {
            let seen = self.verify(seed, &name, false)?;
            let v = self.model.vols.get_mut(&name).expect("model");
            v.cur.clone_from(&seen);
            v.durable = seen;
            for s in &mut v.since {
                s.clear();
            }
        }
        match check(&mut self.disk.clone()) {
            Ok(r) if r.is_clean() => Ok(()),
            other => err(seed, format!("check after the load: {other:?}")),
        }
    }
}

/// Run case `seed`; `faults` break the store on purpose.
fn run_case(seed: u64, faults: Faults) -> Result<Stats, String> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let disk = CrashDisk::junk(DISK, seed);
    let store = Store::format(
        Box::new(disk.clone()),
        &StoreOptions {
            name: "pool".into(),
            cluster_size: CLUSTER,
            journal_len: Some(16 << 10),
        },
    )
    .map_err(|e| format!("seed {seed}: format: {e}"))?;
    store.set_faults(faults);
    let mut c = Case {
        rng,
        disk,
        store,
        model: Model::default(),
        handles: HashMap::new(),
        next_tag: seed << 20,
        next_name: 0,
        stats: Stats::default(),
    };
    for _round in 0..2 {
        let budget = 1 + c.rng.below(300);
        c.disk.die_after(budget);
        let mut doubt = Doubt::None;
        for _ in 0..120 {
            match c.step(seed)? {
                Ok(()) => {}
                Err(d) => {
                    doubt = d;
                    break;
                }
            }
        }
        c.crash(seed, doubt)?;
        c.store.set_faults(faults);
    }
    rng = c.rng;
    let _ = rng.next();
    Ok(c.stats)
}

fn trace() -> bool {
    std::env::var_os("LVOL_CRASH_TRACE").is_some()
}

fn cases() -> (u64, u64) {
    let n = std::env::var("LVOL_CRASH_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let first = std::env::var("LVOL_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    (first, n)
}

#[test]
fn every_crash_leaves_a_loadable_clean_store_and_flushed_data_intact() {
    let (first, n) = cases();
    let mut total = Stats::default();
    for seed in first..first + n {
        match run_case(seed, Faults::default()) {
            Ok(s) => {
                total.steps += s.steps;
                total.full += s.full;
                total.crashes += s.crashes;
            }
            Err(e) => panic!("{e}"),
        }
    }
    eprintln!(
        "{n} cases: {} crashes, {} steps, {} refused for space",
        total.crashes, total.steps, total.full
    );
}

#[test]
fn the_harness_catches_records_written_before_their_data_is_durable() {
    // the store skips the flush that orders data before the records pointing at it: some
    // crash must show a sector holding neither its old nor its new contents
    let mut caught = None;
    let (first, _) = cases();
    for seed in first..=first + 400 {
        if let Err(e) = run_case(
            seed,
            Faults {
                records_before_data: true,
            },
        ) {
            caught = Some(e);
            break;
        }
    }
    let e = caught.expect("a broken ordering went unnoticed in 400 cases");
    eprintln!("caught: {e}");
}
