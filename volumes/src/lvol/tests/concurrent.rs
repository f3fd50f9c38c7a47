//! Many requests in flight at once, completing out of order, with snapshots, clones,
//! deallocations and flushes taken between submissions: every volume reads the last
//! completed write per block, every snapshot the writes completed before it, and the
//! checker stays clean.

use std::collections::HashMap;

use device_model::backend::{Backend, GuestBufferList, IoBuffer, IoOp, IoRequest, MallocBackend};
use nvme_spec::Status;

use super::io::{self, Rng};
use crate::lvol::{LvolBackend, Store, StoreOptions, check};

/// Holds writes (their data too: it lands only when they complete) and completions, and
/// hands them back in a random order, some only at a later poll.
struct Shuffled {
    inner: MallocBackend,
    writes: Vec<(u64, u64, IoBuffer)>,
    held: Vec<(u64, Status)>,
    rng: Rng,
}

impl Backend for Shuffled {
    fn describe(&self) -> String {
        "shuffled".into()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        if let IoOp::Write { .. } = req.op {
            let buf = IoBuffer::new(req.len() as usize);
            let mut data = vec![0u8; req.len() as usize];
            req.iov.copy_to_slice(&mut data);
            buf.write_at(0, &data);
            self.writes.push((req.tag, req.offset, buf));
            return Ok(());
        }
        self.inner.submit(req)
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        let mut i = 0;
        while i < self.writes.len() {
            if self.rng.chance(40) {
                let (tag, offset, buf) = self.writes.swap_remove(i);
                let mut list = GuestBufferList::new();
                list.set_range(buf.buffers(), 0, buf.len() as u64);
                self.inner
                    .submit(&IoRequest {
                        tag,
                        op: IoOp::Write { fua: false },
                        offset,
                        iov: list.as_buffers(),
                    })
                    .expect("a RAM write");
            } else {
                i += 1;
            }
        }
        let held = &mut self.held;
        self.inner.poll(&mut |t, s| held.push((t, s)));
        let mut n = 0;
        let mut i = 0;
        while i < self.held.len() {
            if self.rng.chance(40) {
                let (t, s) = self.held.swap_remove(i);
                done(t, s);
                n += 1;
            } else {
                i += 1;
            }
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len() + self.writes.len()
    }
}

struct Pending {
    buf: IoBuffer,
    _list: GuestBufferList,
    block: u64,
    n: u64,
    tag: u64,
}

/// The unit the model tracks: a 512-byte sector (writes of 1 to 16 of them, aligned to 4 KiB
/// four times out of five).
const BLOCK: u64 = 512;

#[test]
fn out_of_order_completions_with_snapshots_between_them_keep_every_image() {
    for seed in 1..=40u64 {
        let mut rng = Rng(seed * 77 + 1);
        let base = Shuffled {
            inner: MallocBackend::new(64 << 20).unwrap(),
            writes: Vec::new(),
            held: Vec::new(),
            rng: Rng(seed + 5),
        };
        let store = Store::format(
            Box::new(base),
            &StoreOptions {
                name: "p".into(),
                cluster_size: 64 << 10,
                journal_len: Some(64 << 10),
            },
        )
        .unwrap();
        store.create("v", 1 << 20, seed % 2 == 0).unwrap();
        let mut v: LvolBackend = store.open("v").unwrap();
        let blocks = (1 << 20) / BLOCK;
        let one = |tag: u64| -> Vec<u8> {
            let mut v = vec![(tag as u8) | 1; BLOCK as usize];
            v[8..16].copy_from_slice(&tag.to_le_bytes());
            v
        };
        // what each block holds once every completed write is counted
        let mut model: Vec<u64> = vec![0; blocks as usize];
        let mut snaps: Vec<(String, Vec<u64>)> = Vec::new();
        let mut pending: HashMap<u64, Pending> = HashMap::new();
        let mut busy: HashMap<u64, u64> = HashMap::new(); // block -> tag in flight
        let mut next = 1u64;
        for step in 0..3000 {
            let roll = rng.below(100);
            if roll < 70 && pending.len() < 32 {
                let aligned = rng.chance(80);
                let mut b = rng.below(blocks);
                let mut n = 1 + rng.below(16);
                if aligned {
                    b &= !7;
                    n = 8;
                }
                let n = n.min(blocks - b);
                if (b..b + n).any(|k| busy.contains_key(&k)) {
                    continue;
                }
                let tag = next;
                next += 1;
                let buf = IoBuffer::new((n * BLOCK) as usize);
                for k in 0..n {
                    buf.write_at((k * BLOCK) as usize, &one(tag));
                }
                let mut list = GuestBufferList::new();
                list.set_range(buf.buffers(), 0, n * BLOCK);
                let fua = rng.chance(5);
                v.submit(&IoRequest {
                    tag,
                    op: IoOp::Write { fua },
                    offset: b * BLOCK,
                    iov: list.as_buffers(),
                })
                .unwrap();
                for k in b..b + n {
                    busy.insert(k, tag);
                }
                pending.insert(
                    tag,
                    Pending {
                        buf,
                        _list: list,
                        block: b,
                        n,
                        tag,
                    },
                );
            } else if roll < 90 {
                v.poll(&mut |t, s| {
                    assert_eq!(s, Status::SUCCESS, "seed {seed} step {step}");
                    let p = pending.remove(&t).expect("a known tag");
                    for k in p.block..p.block + p.n {
                        busy.remove(&k);
                        model[k as usize] = p.tag;
                    }
                    drop(p.buf);
                });
            } else if roll < 95 {
                // a snapshot while writes are in flight: it holds at least every completed one
                if snaps.len() >= 4 {
                    let (old, _) = snaps.remove(rng.below(4) as usize);
                    store.delete(&old).unwrap();
                }
                let name = format!("s{step}");
                store.snapshot("v", &name).unwrap();
                let mut allowed = model.clone();
                for &b in busy.keys() {
                    allowed[b as usize] = u64::MAX; // either
                }
                snaps.push((name, allowed));
            } else if roll < 97 && busy.is_empty() {
                let b = rng.below(blocks / 128) * 128;
                let st = io::run(
                    &mut v,
                    IoOp::Deallocate { len: 128 * BLOCK },
                    b * BLOCK,
                    None,
                    0,
                )
                .0;
                assert_eq!(st, Status::SUCCESS);
                for k in b..b + 128 {
                    model[k as usize] = 0;
                }
            } else {
                store.flush().unwrap();
            }
        }
        while !pending.is_empty() {
            v.poll(&mut |t, s| {
                assert_eq!(s, Status::SUCCESS);
                let p = pending.remove(&t).expect("a known tag");
                for k in p.block..p.block + p.n {
                    model[k as usize] = p.tag;
                }
            });
        }
        let image = |b: &mut dyn Backend| -> Vec<u64> {
            let data = io::read(b, 0, blocks * BLOCK).1;
            data.chunks(BLOCK as usize)
                .map(|c| u64::from_le_bytes(c[8..16].try_into().unwrap()))
                .collect()
        };
        assert_eq!(image(&mut v), model, "seed {seed}: the volume");
        for (name, allowed) in &snaps {
            let got = image(&mut store.open(name).unwrap());
            for (b, (&g, &a)) in got.iter().zip(allowed).enumerate() {
                assert!(
                    a == u64::MAX || g == a,
                    "seed {seed}: snapshot {name} block {b}: {g} not {a}"
                );
            }
        }
        drop(v);
        let mut b = store.close().map_err(|(_, e)| e).unwrap();
        let r = check(b.as_mut()).unwrap();
        assert!(r.is_clean(), "seed {seed}: {:?}", r.errors);
    }
}

/// Guest data writes land (data and completion) only after 200 polls; everything else
/// (the store's own metadata and copy requests) at once.
struct Slow {
    inner: MallocBackend,
    writes: Vec<(u32, u64, u64, IoBuffer)>,
    done: Vec<(u64, Status)>,
}

impl Backend for Slow {
    fn describe(&self) -> String {
        "slow".into()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        if let IoOp::Write { .. } = req.op
            && req.tag & crate::lvol::syncio::INTERNAL == 0
        {
            let buf = IoBuffer::new(req.len() as usize);
            let mut data = vec![0u8; req.len() as usize];
            req.iov.copy_to_slice(&mut data);
            buf.write_at(0, &data);
            self.writes.push((200, req.tag, req.offset, buf));
            return Ok(());
        }
        self.inner.submit(req)
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        for w in &mut self.writes {
            w.0 = w.0.saturating_sub(1);
        }
        while let Some(i) = self.writes.iter().position(|w| w.0 == 0) {
            let (_, tag, offset, buf) = self.writes.swap_remove(i);
            let mut list = GuestBufferList::new();
            list.set_range(buf.buffers(), 0, buf.len() as u64);
            self.inner
                .submit(&IoRequest {
                    tag,
                    op: IoOp::Write { fua: false },
                    offset,
                    iov: list.as_buffers(),
                })
                .expect("a RAM write");
        }
        let d = &mut self.done;
        self.inner.poll(&mut |t, s| d.push((t, s)));
        let n = self.done.len();
        for (t, s) in self.done.drain(..) {
            done(t, s);
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.writes.len() + self.done.len()
    }
}

#[test]
fn a_partial_granule_write_in_flight_across_a_snapshot_is_not_lost_by_the_next_one() {
    let base = Slow {
        inner: MallocBackend::new(64 << 20).unwrap(),
        writes: Vec::new(),
        done: Vec::new(),
    };
    let store = Store::format(
        Box::new(base),
        &StoreOptions {
            name: "p".into(),
            cluster_size: 64 << 10,
            journal_len: None,
        },
    )
    .unwrap();
    store.create("v", 1 << 20, true).unwrap();
    let mut v = store.open("v").unwrap();
    // sector 0 of granule 0, left in flight
    let a = IoBuffer::new(512);
    a.write_at(0, &[0xaa; 512]);
    let mut la = GuestBufferList::new();
    la.set_range(a.buffers(), 0, 512);
    v.submit(&IoRequest {
        tag: 1,
        op: IoOp::Write { fua: false },
        offset: 0,
        iov: la.as_buffers(),
    })
    .unwrap();
    store.snapshot("v", "s").unwrap();
    // sector 1 of the same granule: the granule is copied up into a new top layer
    let b = IoBuffer::new(512);
    b.write_at(0, &[0xbb; 512]);
    let mut lb = GuestBufferList::new();
    lb.set_range(b.buffers(), 0, 512);
    v.submit(&IoRequest {
        tag: 2,
        op: IoOp::Write { fua: false },
        offset: 512,
        iov: lb.as_buffers(),
    })
    .unwrap();
    let mut done = Vec::new();
    while done.len() < 2 {
        v.poll(&mut |t, s| done.push((t, s)));
    }
    assert!(done.iter().all(|d| d.1 == Status::SUCCESS), "{done:?}");
    let got = io::read(&mut v, 0, 1024).1;
    assert!(
        got[..512].iter().all(|&b| b == 0xaa),
        "the first write was lost"
    );
    assert!(got[512..].iter().all(|&b| b == 0xbb));
}
