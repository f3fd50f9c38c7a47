//! The malloc backend: a namespace in anonymous RAM (SPDK's bdev_malloc).

use nvme_spec::Status;

use super::{Backend, DoneQueue, IoOp, IoRequest};

/// A RAM namespace; contents are lost when the process exits.
pub struct MallocBackend {
    ram: memmap2::MmapMut,
    size: u64,
    done: DoneQueue,
}

impl std::fmt::Debug for MallocBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MallocBackend")
            .field("size", &self.size)
            .finish()
    }
}

/// Errors creating a RAM namespace.
#[derive(Debug, thiserror::Error)]
#[error("cannot allocate {size} bytes for a malloc namespace: {source}")]
pub struct MallocError {
    size: u64,
    source: std::io::Error,
}

impl MallocBackend {
    /// Allocate `size` bytes of zeroed RAM (lazily, with an anonymous mapping).
    pub fn new(size: u64) -> Result<Self, MallocError> {
        let len = usize::try_from(size).map_err(|_| MallocError {
            size,
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
        let ram =
            sys_util::anonymous::lazy_zeroed(len).map_err(|source| MallocError { size, source })?;
        Ok(Self {
            ram,
            size,
            done: DoneQueue::default(),
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), Status> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Status::LBA_OUT_OF_RANGE),
        }
    }
}

impl Backend for MallocBackend {
    fn describe(&self) -> String {
        format!("malloc:{}MiB", self.size >> 20)
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        // zeroing RAM is instant: done now, reported by the next poll
        if let Some(st) = self.zero_now(req) {
            self.done.push(req.tag, st);
            return Ok(());
        }
        let len = req.iov.len();
        self.check(req.offset, len)?;
        if req.op != IoOp::Flush {
            let ours = &mut self.ram[req.offset as usize..(req.offset + len) as usize];
            match req.op {
                IoOp::Read => req.iov.copy_from_slice(ours),
                _ => req.iov.copy_to_slice(ours),
            };
        }
        self.done.push(req.tag, Status::SUCCESS);
        Ok(())
    }
    fn poll(&mut self, done: &mut dyn FnMut(u64, Status)) -> usize {
        self.done.drain(done)
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Status> {
        self.check(offset, len)?;
        self.ram[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn read_sync(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Status> {
        self.check(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.ram[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn flush_sync(&mut self) -> Result<(), Status> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let mut b = super::MallocBackend::new(1 << 20).unwrap();
        crate::backend::tests::exercise(&mut b);
    }
}
