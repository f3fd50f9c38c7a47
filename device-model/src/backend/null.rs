//! The null backend: writes are discarded, reads return zeroes (SPDK's bdev_null).

use nvme_spec::Status;

use super::{Backend, DoneQueue, IoOp, IoRequest, Submitted};

/// Discards writes; reads complete without touching guest memory (like SPDK's null bdev).
#[derive(Debug)]
pub struct NullBackend {
    size: u64,
    done: DoneQueue,
}

impl NullBackend {
    /// A null namespace of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            done: DoneQueue::default(),
        }
    }
}

impl Backend for NullBackend {
    fn describe(&self) -> String {
        format!("null:{}MiB", self.size >> 20)
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        debug_assert!(matches!(req.op, IoOp::Read | IoOp::Write { .. }) != req.iov.is_empty());
        self.done.push(req.tag, Status::SUCCESS);
        Ok(())
    }
    fn execute(&mut self, req: &IoRequest<'_>) -> Result<Submitted, Status> {
        debug_assert!(matches!(req.op, IoOp::Read | IoOp::Write { .. }) != req.iov.is_empty());
        Ok(Submitted::Completed)
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        self.done.drain(done)
    }
    fn poll_into(&mut self, done: &mut Vec<(u64, Status)>) -> usize {
        self.done.append_to(done)
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
}
