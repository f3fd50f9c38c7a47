//! Load time of a big store (BENCHMARKS.md, `scripts/bench-lvol.sh`): 10,000 volumes and
//! 1,048,576 mapped clusters scattered over the store (no runs to compress), on a sparse
//! RAM base that keeps only what was written (the metadata). Ignored by default:
//! `cargo test --release -p volumes --lib lvol::tests::bench -- --ignored --nocapture`.

use std::collections::HashMap;
use std::time::Instant;

use device_model::backend::{Backend, IoOp, IoRequest};
use nvme_spec::Status;

use super::gate::mib_store;
use super::io::Rng;
use crate::lvol::map::Entry;
use crate::lvol::{Store, StoreOptions, check};

const BLOCK: u64 = 4096;

/// Keeps written 4 KiB blocks only (reads of anything else are zeroes).
#[derive(Default)]
struct Sparse {
    size: u64,
    blocks: HashMap<u64, Box<[u8]>>,
    done: Vec<(u64, Status)>,
}

impl Backend for Sparse {
    fn describe(&self) -> String {
        "sparse".into()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        let (off, len) = (req.offset, req.len());
        assert!(off.is_multiple_of(BLOCK) && len.is_multiple_of(BLOCK));
        match req.op {
            IoOp::Read => {
                let zero = vec![0u8; BLOCK as usize];
                for k in 0..len / BLOCK {
                    let b = self
                        .blocks
                        .get(&(off / BLOCK + k))
                        .map_or(&zero[..], |b| &b[..]);
                    req.iov.write_at((k * BLOCK) as usize, b);
                }
            }
            IoOp::Write { .. } => {
                for k in 0..len / BLOCK {
                    let mut b = vec![0u8; BLOCK as usize];
                    req.iov.read_at((k * BLOCK) as usize, &mut b);
                    self.blocks.insert(off / BLOCK + k, b.into_boxed_slice());
                }
            }
            IoOp::WriteZeroes { .. } | IoOp::Deallocate { .. } => {
                for k in 0..len / BLOCK {
                    self.blocks.remove(&(off / BLOCK + k));
                }
            }
            IoOp::Flush => {}
        }
        self.done.push((req.tag, Status::SUCCESS));
        Ok(())
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        let n = self.done.len();
        for (t, s) in self.done.drain(..) {
            done(t, s);
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

#[test]
#[ignore = "a benchmark: run with --ignored in release"]
fn load_time_of_10000_volumes_and_1m_mapped_clusters() {
    const VOLUMES: u32 = 10_000;
    const PER: u32 = 105; // 1.05 M mapped
    let cluster = 16u64 << 10;
    let base = Sparse {
        size: (1u64 << 20) * cluster + (1 << 30),
        ..Sparse::default()
    };
    let t = Instant::now();
    let store = Store::format(
        Box::new(base),
        &StoreOptions {
            name: "big".into(),
            cluster_size: cluster,
            journal_len: None,
        },
    )
    .unwrap();
    {
        let mut c = store.core();
        // scatter the free list: no two neighbours in a map are neighbours on disk
        let mut r = Rng(7);
        for i in (1..c.free.len()).rev() {
            let j = r.below(i as u64 + 1) as usize;
            c.free.swap(i, j);
        }
    }
    for v in 0..VOLUMES {
        let name = format!("vol{v:05}");
        store.create(&name, u64::from(PER) * cluster, true).unwrap();
        let mut c = store.core();
        let id = c.id_of(&name).unwrap();
        for l in 0..PER {
            let p = c.alloc().unwrap();
            c.meta.volumes.get_mut(&id).unwrap().map[l as usize] = Entry::Full(p);
            c.dirty.insert((id, l));
        }
    }
    store.flush().unwrap();
    let built = t.elapsed();
    let st = store.status();
    let base = store.close().map_err(|(_, e)| e).unwrap();
    let mut base = base;
    let t = Instant::now();
    let r = check(base.as_mut()).unwrap();
    let checked = t.elapsed();
    assert!(r.is_clean(), "{:?}", r.errors);
    let t = Instant::now();
    let (s, rep) = Store::load(base).unwrap();
    let loaded = t.elapsed();
    assert_eq!(rep.volumes, VOLUMES as usize);
    assert_eq!(rep.mapped, u64::from(VOLUMES * PER));
    eprintln!(
        "bench lvol-load volumes={} mapped={} journal-records={} checkpoint-bytes={} \
         load-ms={} (read+replay+derive, then a new checkpoint written) check-ms={} build-s={:.1}",
        rep.volumes,
        rep.mapped,
        rep.replayed,
        st.metadata.0,
        loaded.as_millis(),
        checked.as_millis(),
        built.as_secs_f64()
    );
    drop(s);
}

/// 4 KiB requests at QD32 on `b` at the offsets `next` gives (until it gives none or
/// `secs` pass); requests per second.
fn qd32_at(
    b: &mut dyn Backend,
    write: bool,
    secs: f64,
    mut next: impl FnMut() -> Option<u64>,
) -> f64 {
    use device_model::backend::{GuestBufferList, IoBuffer};
    let bufs: Vec<IoBuffer> = (0..32).map(|_| IoBuffer::new(4096)).collect();
    let lists: Vec<GuestBufferList> = bufs
        .iter()
        .map(|x| {
            let mut l = GuestBufferList::new();
            l.set_range(x.buffers(), 0, 4096);
            l
        })
        .collect();
    let op = if write {
        IoOp::Write { fua: false }
    } else {
        IoOp::Read
    };
    let submit = |b: &mut dyn Backend, slot: u64, off: u64| {
        b.submit(&IoRequest {
            tag: slot,
            op,
            offset: off,
            iov: lists[slot as usize].as_buffers(),
        })
        .unwrap();
    };
    let t = Instant::now();
    for slot in 0..32 {
        if let Some(off) = next() {
            submit(b, slot, off);
        }
    }
    let mut n = 0u64;
    let mut free = Vec::with_capacity(32);
    let mut more = true;
    while b.in_flight() > 0 {
        b.poll(&mut |tag, s| {
            assert_eq!(s, Status::SUCCESS);
            free.push(tag);
        });
        n += free.len() as u64;
        for slot in free.drain(..) {
            if more && t.elapsed().as_secs_f64() < secs {
                match next() {
                    Some(off) => submit(b, slot, off),
                    None => more = false,
                }
            }
        }
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// Random 4 KiB requests at QD32 on `b` for `secs`; requests per second.
fn qd32(b: &mut dyn Backend, write: bool, secs: f64, seed: u64) -> f64 {
    let blocks = b.size() / 4096;
    let mut r = Rng(seed | 1);
    qd32_at(b, write, secs, move || Some(r.below(blocks) * 4096))
}

/// Every 4 KiB block of `b` once, in a random order, at QD32; requests per second.
fn each_once(b: &mut dyn Backend, seed: u64) -> f64 {
    let blocks = b.size() / 4096;
    let mut order: Vec<u64> = (0..blocks).collect();
    let mut r = Rng(seed | 1);
    for i in (1..order.len()).rev() {
        order.swap(i, r.below(i as u64 + 1) as usize);
    }
    let mut it = order.into_iter();
    qd32_at(b, true, f64::MAX, move || it.next().map(|x| x * 4096))
}

/// Write all of `b` in 1 MiB requests (the RAM behind it is then touched: no page fault
/// in what is measured).
fn touch(b: &mut dyn Backend) {
    use device_model::backend::{GuestBufferList, IoBuffer};
    let buf = IoBuffer::new(1 << 20);
    buf.write_at(0, &vec![0x5a; 1 << 20]);
    let mut l = GuestBufferList::new();
    l.set_range(buf.buffers(), 0, 1 << 20);
    let mut off = 0;
    while off < b.size() {
        b.submit(&IoRequest {
            tag: 1,
            op: IoOp::Write { fua: false },
            offset: off,
            iov: l.as_buffers(),
        })
        .unwrap();
        while b.in_flight() > 0 {
            b.poll(&mut |_, _| {});
        }
        off += 1 << 20;
    }
}

#[test]
#[ignore = "a benchmark: run with --ignored in release"]
fn thick_thin_and_cow_vs_raw_ram_4k_qd32_in_process() {
    use device_model::backend::MallocBackend;
    let size = 256u64 << 20;
    let mut raw = MallocBackend::new(size).unwrap();
    touch(&mut raw);
    let mut base = MallocBackend::new(3 * size + (64 << 20)).unwrap();
    touch(&mut base);
    let store = mib_store(Box::new(base));
    store.create("thick", size, false).unwrap();
    let mut thick = store.open("thick").unwrap();
    touch(&mut thick);
    for write in [false, true] {
        let mut ratios = Vec::new();
        let (mut best_raw, mut best_thick) = (0f64, 0f64);
        for round in 0..9 {
            let a = qd32(&mut raw, write, 0.3, round);
            let b = qd32(&mut thick, write, 0.3, round);
            best_raw = best_raw.max(a);
            best_thick = best_thick.max(b);
            ratios.push(b / a);
        }
        ratios.sort_by(f64::total_cmp);
        eprintln!(
            "bench lvol-layer thick-vs-raw {} median-ratio={:.3} best-raw={best_raw:.0} best-thick={best_thick:.0} (requests/s, no controller)",
            if write { "randwrite" } else { "randread" },
            ratios[ratios.len() / 2]
        );
    }
    // first writes: every block once in a random order; thin (a cluster allocated per
    // 1 MiB, each granule marked), thick in place, thick after a snapshot (copy-on-write)
    for round in 0..3u64 {
        let name = format!("thin{round}");
        store.create(&name, size, true).unwrap();
        let mut thin = store.open(&name).unwrap();
        let k = each_once(&mut thick, round);
        let t = each_once(&mut thin, round);
        store.snapshot("thick", &format!("s{round}")).unwrap();
        let c = each_once(&mut thick, round + 100);
        eprintln!(
            "bench lvol-layer first-writes round={round} thick={k:.0} thin={t:.0} cow={c:.0} thin/thick={:.3} cow/thick={:.3}",
            t / k,
            c / k
        );
        drop(thin);
        store.delete(&name).unwrap();
        store.delete(&format!("s{round}")).unwrap();
        // the thick volume's clusters are its own again (the copies are full)
        store.flush().unwrap();
    }
}

/// `PER_IO_ONLY=raw|thick PER_IO_OP=read|write PER_IO_COUNT=N`: N random 4 KiB requests at
/// QD32 on a RAM backend or a thick volume on one, nothing else timed; under callgrind the
/// difference of two counts gives the volume layer's instructions per I/O.
#[test]
#[ignore = "a benchmark: run with --ignored in release, under callgrind"]
fn per_io_cost_of_a_thick_volume_against_its_base() {
    use device_model::backend::MallocBackend;
    let only = std::env::var("PER_IO_ONLY").unwrap_or_else(|_| "thick".into());
    let write = std::env::var("PER_IO_OP").is_ok_and(|o| o == "write");
    let ios: u64 = std::env::var("PER_IO_COUNT").map_or(100_000, |v| v.parse().unwrap());
    let size = 64u64 << 20;
    let mut b: Box<dyn Backend> = if only == "raw" {
        Box::new(MallocBackend::new(size).unwrap())
    } else {
        let store = mib_store(Box::new(MallocBackend::new(size + (16 << 20)).unwrap()));
        store.create("thick", size, false).unwrap();
        Box::new(store.open("thick").unwrap())
    };
    let blocks = size / 4096;
    let mut r = Rng(7);
    let mut left = ios;
    qd32_at(b.as_mut(), write, f64::MAX, move || {
        left = left.checked_sub(1)?;
        Some(r.below(blocks) * 4096)
    });
}
