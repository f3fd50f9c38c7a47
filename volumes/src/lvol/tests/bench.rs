//! Load time of a big store (BENCHMARKS.md, `scripts/bench-lvol.sh`): 10,000 volumes and
//! 1,048,576 mapped clusters scattered over the store (no runs to compress), on a sparse
//! RAM base that keeps only what was written (the metadata). Ignored by default:
//! `cargo test --release -p volumes --lib lvol::tests::bench -- --ignored --nocapture`.

use std::collections::HashMap;
use std::time::Instant;

use device_model::backend::{Backend, IoOp, IoRequest};
use nvme_spec::Status;

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
