//! A RAM disk with a volatile write cache that a test can crash. Writes since the last
//! Flush are kept as a log; at a crash each logged write is applied per 512-byte sector
//! or not, in a shuffled order (dropped, reordered, torn). The disk can also be set to
//! die after a number of further writes and flushes: from then on every request fails,
//! as if the machine stopped there.

use std::sync::{Arc, Mutex, PoisonError};

use device_model::backend::{Backend, IoOp, IoRequest};
use nvme_spec::Status;

use super::io::Rng;

const SECTOR: usize = 512;

#[derive(Debug)]
struct State {
    durable: Vec<u8>,
    current: Vec<u8>,
    log: Vec<(usize, Vec<u8>)>,
    ops_left: Option<u64>,
    dead: bool,
}

/// A crashable disk (clones share it).
#[derive(Clone, Debug)]
pub struct CrashDisk {
    s: Arc<Mutex<State>>,
    done: Vec<(u64, Status)>,
    /// With [`CrashDisk::holding`]: guest data writes wait here (data not landed) until a
    /// poll lets them through, in a random order.
    held: Vec<(u64, usize, Vec<u8>)>,
    hold: Option<Rng>,
}

impl CrashDisk {
    /// A disk holding `image`.
    pub fn new(image: Vec<u8>) -> Self {
        Self {
            s: Arc::new(Mutex::new(State {
                durable: image.clone(),
                current: image,
                log: Vec::new(),
                ops_left: None,
                dead: false,
            })),
            done: Vec::new(),
            held: Vec::new(),
            hold: None,
        }
    }

    /// This handle holds guest data writes (data and completion) for a random number of
    /// polls: requests complete out of order and several are in flight at a crash.
    pub fn holding(mut self, seed: u64) -> Self {
        self.hold = Some(Rng(seed | 1));
        self
    }

    /// A disk of `len` bytes of junk (what a reused disk holds: never zeroes by luck).
    pub fn junk(len: usize, seed: u64) -> Self {
        let mut r = Rng(seed | 1);
        let mut v = vec![0u8; len];
        for c in v.chunks_mut(8) {
            let x = r.next().to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
        Self::new(v)
    }

    /// Die after `n` more writes or flushes.
    pub fn die_after(&self, n: u64) {
        self.lock().ops_left = Some(n);
    }

    /// Has it died?
    pub fn dead(&self) -> bool {
        self.lock().dead
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.s.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What survives a crash now: the durable image plus each unflushed write's sectors,
    /// each kept with probability `keep` percent, writes applied in a shuffled order.
    pub fn crash_image(&self, rng: &mut Rng, keep: u64) -> Vec<u8> {
        let s = self.lock();
        let mut img = s.durable.clone();
        let mut order: Vec<usize> = (0..s.log.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for i in order {
            let (off, data) = &s.log[i];
            for (k, sec) in data.chunks(SECTOR).enumerate() {
                if rng.chance(keep) {
                    let at = off + k * SECTOR;
                    img[at..at + sec.len()].copy_from_slice(sec);
                }
            }
        }
        img
    }
}

impl Backend for CrashDisk {
    fn describe(&self) -> String {
        "crash-disk".into()
    }

    fn size(&self) -> u64 {
        self.lock().current.len() as u64
    }

    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        let mut s = self.s.lock().unwrap_or_else(PoisonError::into_inner);
        let mutates = !matches!(req.op, IoOp::Read);
        if mutates
            && !s.dead
            && let Some(n) = s.ops_left.as_mut()
        {
            if *n == 0 {
                s.dead = true;
            } else {
                *n -= 1;
            }
        }
        if s.dead {
            self.done.push((req.tag, Status::INTERNAL_ERROR));
            return Ok(());
        }
        let off = req.offset as usize;
        let len = req.len() as usize;
        // the store's own requests are whole 4 KiB blocks (a base may take nothing else:
        // O_DIRECT files, 4 KiB-sector devices); guest data keeps the guest's 512 bytes
        let own = req.tag & crate::lvol::syncio::INTERNAL != 0;
        let unit = if own { 4096 } else { 512 };
        assert!(
            off.is_multiple_of(unit) && len.is_multiple_of(unit),
            "a request at {off}+{len} (tag {:#x})",
            req.tag
        );
        if off + len > s.current.len() {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        match req.op {
            IoOp::Read => {
                req.iov.copy_from_slice(&s.current[off..off + len]);
            }
            IoOp::Write { fua } => {
                let mut data = vec![0u8; len];
                req.iov.copy_to_slice(&mut data);
                if !own && self.hold.is_some() {
                    self.held.push((req.tag, off, data));
                    return Ok(());
                }
                s.current[off..off + len].copy_from_slice(&data);
                if fua {
                    s.durable[off..off + len].copy_from_slice(&data);
                }
                s.log.push((off, data));
            }
            IoOp::WriteZeroes { .. } | IoOp::Deallocate { .. } => {
                let data = vec![0u8; len];
                s.current[off..off + len].copy_from_slice(&data);
                s.log.push((off, data));
            }
            IoOp::Flush => {
                let State {
                    durable,
                    current,
                    log,
                    ..
                } = &mut *s;
                for (off, data) in log.drain(..) {
                    durable[off..off + data.len()].copy_from_slice(&current[off..off + data.len()]);
                }
            }
        }
        self.done.push((req.tag, Status::SUCCESS));
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        if let Some(rng) = self.hold.as_mut() {
            let mut s = self.s.lock().unwrap_or_else(PoisonError::into_inner);
            let mut i = 0;
            while i < self.held.len() {
                if rng.chance(35) {
                    let (tag, off, data) = self.held.swap_remove(i);
                    if s.dead {
                        self.done.push((tag, Status::INTERNAL_ERROR));
                    } else {
                        s.current[off..off + data.len()].copy_from_slice(&data);
                        s.log.push((off, data));
                        self.done.push((tag, Status::SUCCESS));
                    }
                } else {
                    i += 1;
                }
            }
        }
        let n = self.done.len();
        for (t, s) in self.done.drain(..) {
            done(t, s);
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.done.len() + self.held.len()
    }
}
