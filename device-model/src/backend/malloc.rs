//! The malloc backend: a namespace in anonymous RAM (SPDK's bdev_malloc).

use nvme_spec::Status;

use super::{Backend, DoneQueue, IoOp, IoRequest};

/// A RAM namespace; contents are lost when the process exits.
pub struct MallocBackend {
    ptr: *mut u8,
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

// SAFETY: the buffer is owned exclusively by this backend.
unsafe impl Send for MallocBackend {}

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
        // SAFETY: anonymous private mapping, result checked; owned by self and unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MallocError {
                size,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            ptr: ptr.cast(),
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

impl Drop for MallocBackend {
    fn drop(&mut self) {
        // SAFETY: ptr/size come from the mmap in new().
        unsafe { libc::munmap(self.ptr.cast(), self.size as usize) };
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
            // SAFETY: [offset, offset+len) is inside our own mapping (checked above), which
            // only this backend (borrowed mutably) accesses.
            let ours = unsafe {
                std::slice::from_raw_parts_mut(self.ptr.add(req.offset as usize), len as usize)
            };
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
        // SAFETY: range checked against our buffer.
        unsafe { std::ptr::write_bytes(self.ptr.add(offset as usize), 0, len as usize) };
        Ok(())
    }
    fn read_sync(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Status> {
        self.check(offset, buf.len() as u64)?;
        // SAFETY: range checked against our buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.add(offset as usize),
                buf.as_mut_ptr(),
                buf.len(),
            );
        };
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
