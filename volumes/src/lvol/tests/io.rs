//! Synchronous requests on a backend, for tests.

use device_model::backend::{Backend, GuestBufferList, IoBuffer, IoOp, IoRequest};
use nvme_spec::Status;

/// Run one request and wait for it; returns the status and, for reads, the data.
pub fn run(
    b: &mut dyn Backend,
    op: IoOp,
    off: u64,
    data: Option<&[u8]>,
    len: u64,
) -> (Status, Vec<u8>) {
    let buf = IoBuffer::new(len as usize);
    if let Some(d) = data {
        buf.write_at(0, d);
    }
    let mut list = GuestBufferList::new();
    if matches!(op, IoOp::Read | IoOp::Write { .. }) {
        list.set_range(buf.buffers(), 0, len);
    }
    if let Err(s) = b.submit(&IoRequest {
        tag: 0x55,
        op,
        offset: off,
        iov: list.as_buffers(),
    }) {
        return (s, Vec::new());
    }
    let mut got = None;
    let t = std::time::Instant::now();
    while got.is_none() {
        assert!(t.elapsed().as_secs() < 30, "{op:?} never completed");
        b.poll(&mut |tag, s| {
            assert_eq!(tag, 0x55);
            got = Some(s);
        });
    }
    let mut out = vec![0u8; len as usize];
    buf.read_at(0, &mut out);
    (got.unwrap_or(Status::INTERNAL_ERROR), out)
}

pub fn read(b: &mut dyn Backend, off: u64, len: u64) -> (Status, Vec<u8>) {
    run(b, IoOp::Read, off, None, len)
}

pub fn flush(b: &mut dyn Backend) -> Status {
    run(b, IoOp::Flush, 0, None, 0).0
}

/// A small deterministic generator (xorshift*).
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The status of a 4 KiB write at 0 (to see a refusal).
pub fn write_status(b: &mut dyn Backend) -> Status {
    run(b, IoOp::Write { fua: false }, 0, Some(&[0u8; 4096]), 4096).0
}
