//! Crash consistency with many requests in flight: a volume written at up to 16
//! requests at once over a [`CrashDisk`] that lands writes (data and completion) in a
//! random order, with Flushes, snapshots and snapshot deletions among them, then a crash
//! at a random point. A Flush covers the writes completed before it was submitted; what
//! was in flight at the crash, or completed after the last Flush, may read old or new. The
//! checker must be clean, every acknowledged-and-flushed write must read back, and every
//! snapshot must hold what was completed before it.

use std::collections::{BTreeMap, HashMap};

use device_model::backend::{Backend, GuestBufferList, IoBuffer, IoOp, IoRequest};
use nvme_spec::Status;

use super::crash_disk::CrashDisk;
use super::io::Rng;
use crate::lvol::{Faults, LvolBackend, Store, StoreOptions, check};

const SECTOR: u64 = 512;

fn sector(tag: u64, s: u64) -> Vec<u8> {
    if tag == 0 {
        return vec![0; 512];
    }
    let mut b = vec![0u8; 512];
    b[..8].copy_from_slice(&tag.to_le_bytes());
    b[8..16].copy_from_slice(&s.to_le_bytes());
    for (i, x) in b[16..].iter_mut().enumerate() {
        *x = (tag as usize).wrapping_mul(31).wrapping_add(i) as u8;
    }
    b
}

fn decode(d: &[u8], s: u64) -> Option<u64> {
    if d.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let tag = u64::from_le_bytes(d[..8].try_into().ok()?);
    (d == sector(tag, s).as_slice()).then_some(tag)
}

struct InFlight {
    _buf: IoBuffer,
    _list: GuestBufferList,
    s0: u64,
    n: u64,
    value: u64,
}

/// Per sector: the flushed value and what else may be there.
#[derive(Clone)]
struct Allowed {
    durable: Vec<u64>,
    maybe: Vec<Vec<u64>>,
}

impl Allowed {
    fn ok(&self, s: usize, v: u64) -> bool {
        self.durable[s] == v || self.maybe[s].contains(&v)
    }
}

struct Case {
    v: LvolBackend,
    store: Store,
    disk: CrashDisk,
    rng: Rng,
    /// Value a read returns now (completed writes).
    cur: Vec<u64>,
    /// Completed writes with their completion number, since the last covered flush.
    since: Vec<Vec<(u64, u64)>>,
    durable: Vec<u64>,
    acks: u64,
    flights: HashMap<u64, InFlight>,
    busy: Vec<bool>,
    next: u64,
    /// Snapshots: name -> what they may hold; `None` in the map key set means in doubt.
    snaps: BTreeMap<String, (Allowed, bool)>,
}

impl Case {
    /// Poll once; completions of writes become acknowledged. Err: the disk died.
    fn poll(&mut self, mut mine: Option<(u64, &mut Option<Status>)>) -> Result<(), ()> {
        let mut got = Vec::new();
        self.v.poll(&mut |t, s| got.push((t, s)));
        let mut dead = false;
        for (t, s) in got {
            if let Some((tag, slot)) = mine.as_mut()
                && *tag == t
            {
                **slot = Some(s);
                continue;
            }
            let f = self.flights.remove(&t).expect("a known tag");
            for k in f.s0..f.s0 + f.n {
                self.busy[k as usize] = false;
            }
            if s.is_success() {
                self.acks += 1;
                for k in f.s0..f.s0 + f.n {
                    self.cur[k as usize] = f.value;
                    self.since[k as usize].push((self.acks, f.value));
                }
            } else {
                // not acknowledged: it may or may not have landed
                for k in f.s0..f.s0 + f.n {
                    self.since[k as usize].push((u64::MAX, f.value));
                }
                dead = true;
            }
        }
        if dead { Err(()) } else { Ok(()) }
    }

    /// Run one request to its completion (others complete meanwhile).
    fn run(&mut self, op: IoOp, off: u64) -> Status {
        let tag = 1 << 39;
        if let Err(s) = self.v.submit(&IoRequest {
            tag,
            op,
            offset: off,
            iov: device_model::backend::GuestBuffers::EMPTY,
        }) {
            return s;
        }
        let mut st = None;
        while st.is_none() {
            let _ = self.poll(Some((tag, &mut st)));
        }
        st.unwrap_or(Status::INTERNAL_ERROR)
    }

    /// A flush (or a management change, which commits) succeeded that started when
    /// `acks` writes had completed.
    fn flushed(&mut self, acks: u64, at: &[u64]) {
        self.durable.copy_from_slice(at);
        for s in &mut self.since {
            s.retain(|&(a, _)| a > acks);
        }
    }

    /// What may be read at each sector after a crash now.
    fn allowed(&self) -> Allowed {
        let mut maybe: Vec<Vec<u64>> = self
            .since
            .iter()
            .map(|v| v.iter().map(|x| x.1).collect())
            .collect();
        for f in self.flights.values() {
            for k in f.s0..f.s0 + f.n {
                maybe[k as usize].push(f.value);
            }
        }
        Allowed {
            durable: self.durable.clone(),
            maybe,
        }
    }
}

fn run_case(seed: u64, faults: Faults) -> Result<(), String> {
    let mut rng = Rng(seed * 0x9e37_79b9 + 7);
    let disk = CrashDisk::junk(2 << 20, seed);
    let store = Store::format(
        Box::new(disk.clone().holding(seed)),
        &StoreOptions {
            name: "p".into(),
            cluster_size: 16 << 10,
            journal_len: Some(16 << 10),
        },
    )
    .map_err(|e| e.to_string())?;
    let size = (4 + rng.below(12)) * (16 << 10);
    store
        .create("v", size, rng.chance(60))
        .map_err(|e| e.to_string())?;
    store.set_faults(faults);
    let v = store.open("v").map_err(|e| e.to_string())?;
    let secs = (size / SECTOR) as usize;
    let mut c = Case {
        v,
        store,
        disk,
        rng,
        cur: vec![0; secs],
        since: vec![Vec::new(); secs],
        durable: vec![0; secs],
        acks: 0,
        flights: HashMap::new(),
        busy: vec![false; secs],
        next: seed << 24,
        snaps: BTreeMap::new(),
    };
    c.disk.die_after(1 + c.rng.below(250));
    let mut next_snap = 0;
    'work: for _ in 0..400 {
        let roll = c.rng.below(100);
        if roll < 50 && c.flights.len() < 16 {
            let aligned = c.rng.chance(75);
            let mut s0 = c.rng.below(secs as u64);
            let mut n = 1 + c.rng.below(24);
            if aligned {
                s0 &= !7;
                n = n.div_ceil(8) * 8;
            }
            let n = n.min(secs as u64 - s0);
            if (s0..s0 + n).any(|k| c.busy[k as usize]) {
                continue;
            }
            c.next += 1;
            let value = c.next;
            let buf = IoBuffer::new((n * SECTOR) as usize);
            for k in 0..n {
                buf.write_at((k * SECTOR) as usize, &sector(value, s0 + k));
            }
            let mut list = GuestBufferList::new();
            list.set_range(buf.buffers(), 0, n * SECTOR);
            let tag = value;
            let st = c.v.submit(&IoRequest {
                tag,
                op: IoOp::Write { fua: false },
                offset: s0 * SECTOR,
                iov: list.as_buffers(),
            });
            match st {
                Ok(()) => {}
                Err(Status::CAPACITY_EXCEEDED) => continue,
                Err(_) => break 'work,
            }
            for k in s0..s0 + n {
                c.busy[k as usize] = true;
            }
            c.flights.insert(
                tag,
                InFlight {
                    _buf: buf,
                    _list: list,
                    s0,
                    n,
                    value,
                },
            );
        } else if roll < 80 {
            if c.poll(None).is_err() {
                break 'work;
            }
        } else if roll < 90 {
            let (acks, at) = (c.acks, c.cur.clone());
            let st = c.run(IoOp::Flush, 0);
            if !st.is_success() {
                break 'work;
            }
            c.flushed(acks, &at);
        } else if roll < 96 {
            next_snap += 1;
            let name = format!("s{next_snap}");
            // completed before: durable by the snapshot's commit; in flight: either
            let mut allowed = c.allowed();
            let (acks, at) = (c.acks, c.cur.clone());
            allowed.durable.clone_from(&at);
            for m in &mut allowed.maybe {
                m.clear();
            }
            for f in c.flights.values() {
                for k in f.s0..f.s0 + f.n {
                    allowed.maybe[k as usize].push(f.value);
                }
            }
            match c.store.snapshot("v", &name) {
                Ok(()) => {
                    c.flushed(acks, &at);
                    c.snaps.insert(name, (allowed, true));
                }
                Err(_) if c.disk.dead() => {
                    c.snaps.insert(name, (allowed, false));
                    break 'work;
                }
                Err(e) => return Err(format!("seed {seed}: snapshot: {e}")),
            }
        } else if let Some(name) = c.snaps.keys().next().cloned() {
            let (acks, at) = (c.acks, c.cur.clone());
            match c.store.delete(&name) {
                Ok(()) => {
                    c.flushed(acks, &at);
                    c.snaps.remove(&name);
                }
                Err(_) if c.disk.dead() => {
                    if let Some(s) = c.snaps.get_mut(&name) {
                        s.1 = false;
                    }
                    break 'work;
                }
                Err(e) => return Err(format!("seed {seed}: delete: {e}")),
            }
        }
    }
    // crash: what was in flight stays in flight
    let allowed = c.allowed();
    let keep = [0, 50, 100][c.rng.below(3) as usize];
    let img = c.disk.crash_image(&mut c.rng, keep);
    let mut probe = CrashDisk::new(img.clone());
    let r = check(&mut probe).map_err(|e| format!("seed {seed}: check: {e}"))?;
    if !r.is_clean() {
        return Err(format!("seed {seed}: check: {:?}", r.errors));
    }
    let (store, _) = Store::load(Box::new(CrashDisk::new(img)))
        .map_err(|e| format!("seed {seed}: load: {e}"))?;
    let read = |store: &Store, name: &str| -> Result<Vec<u8>, String> {
        let mut b = store.open(name).map_err(|e| e.to_string())?;
        let (st, data) = super::io::read(&mut b, 0, size);
        if st.is_success() {
            Ok(data)
        } else {
            Err(format!("read {name}: {st:?}"))
        }
    };
    let check_image = |what: &str, data: &[u8], a: &Allowed| -> Result<(), String> {
        for (s, chunk) in data.chunks(SECTOR as usize).enumerate() {
            let got = decode(chunk, s as u64);
            if !got.is_some_and(|v| a.ok(s, v)) {
                return Err(format!(
                    "seed {seed}: {what} sector {s}: {got:?}, allowed {} or {:?}",
                    a.durable[s], a.maybe[s]
                ));
            }
        }
        Ok(())
    };
    check_image("v", &read(&store, "v")?, &allowed)?;
    let names: Vec<String> = store.list().into_iter().map(|x| x.name).collect();
    for (name, (a, sure)) in &c.snaps {
        if names.contains(name) {
            check_image(name, &read(&store, name)?, a)?;
        } else if *sure {
            return Err(format!(
                "seed {seed}: snapshot {name} is gone after the crash"
            ));
        }
    }
    Ok(())
}

#[test]
fn crashes_with_many_writes_in_flight_keep_flushed_data_and_snapshot_images() {
    let n: u64 = std::env::var("LVOL_CRASH_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(800, |n: u64| n.max(1));
    for seed in 1..=n {
        if let Err(e) = run_case(seed, Faults::default()) {
            panic!("{e}");
        }
    }
}

#[test]
fn with_writes_in_flight_too_the_harness_catches_records_before_their_data() {
    let caught = (1..=800).find_map(|seed| {
        run_case(
            seed,
            Faults {
                records_before_data: true,
            },
        )
        .err()
    });
    let e = caught.expect("a broken ordering went unnoticed in 800 cases");
    eprintln!("caught: {e}");
}
