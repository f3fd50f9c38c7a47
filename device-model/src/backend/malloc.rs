//! The malloc backend: a namespace in RAM (SPDK's bdev_malloc): anonymous memory, or a
//! memfd another process keeps (a supervised worker's, [`MallocBackend::kept`]).

use nvme_spec::Status;

use super::{Backend, DoneQueue, IoOp, IoRequest};

/// A RAM namespace; contents are lost when the process exits, unless its memfd is kept by
/// another ([`MallocBackend::kept`]).
pub struct MallocBackend {
    ram: memmap2::MmapMut,
    size: u64,
    /// In a kept memfd (pages are released by punching holes, not dropped from a private
    /// mapping).
    kept: bool,
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
            kept: false,
            done: DoneQueue::default(),
        })
    }

    /// The RAM of memfd `fd`, which must hold exactly `size` bytes and is kept by another
    /// process (a supervisor) across the lives of those that map it: what an earlier one
    /// wrote is read back.
    pub fn kept(fd: std::os::fd::OwnedFd, size: u64) -> Result<Self, MallocError> {
        let ram =
            sys_util::kept_ram::map(fd, size).map_err(|source| MallocError { size, source })?;
        Ok(Self {
            ram,
            size,
            kept: true,
            done: DoneQueue::default(),
        })
    }

    /// `size` bytes of RAM at `offset` of memfd `fd`, which another process keeps (a
    /// namespace of a kept pool: one memfd, a range per namespace).
    pub fn kept_range(
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        size: u64,
    ) -> Result<Self, MallocError> {
        let ram = sys_util::kept_ram::map_range(fd, offset, size)
            .map_err(|source| MallocError { size, source })?;
        Ok(Self {
            ram,
            size,
            kept: true,
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

impl MallocBackend {
    /// Zero `[offset, offset + len)` (checked): whole pages are given back to the kernel
    /// (`MADV_DONTNEED` on a private anonymous mapping: they read as zeroes and use no
    /// memory until written again), the partial pages at either end are cleared.
    fn zero(&mut self, offset: u64, len: u64) -> Result<(), Status> {
        self.check(offset, len)?;
        // the kernel's page: a hole punched on a 64 KiB-page kernel must not reach past the range
        let page = sys_util::anonymous::page_size() as u64;
        let (start, end) = (offset, offset + len);
        let (inner_start, inner_end) = (start.next_multiple_of(page), end - end % page);
        let (at, n) = (
            inner_start as usize,
            inner_end.saturating_sub(inner_start) as usize,
        );
        let released = inner_start < inner_end
            && if self.kept {
                sys_util::kept_ram::release_pages(&mut self.ram, at, n)
            } else {
                sys_util::anonymous::release_pages(&mut self.ram, at, n)
            };
        let pieces = if released {
            [(start, inner_start), (inner_end, end)]
        } else {
            [(start, end), (end, end)]
        };
        for (a, b) in pieces {
            if a < b {
                self.ram[a as usize..b as usize].fill(0);
            }
        }
        Ok(())
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
        // RAM is instant: every op is done now and reported by the next poll
        let st = match req.op {
            IoOp::Flush => Ok(()),
            IoOp::WriteZeroes { len } | IoOp::Deallocate { len } => self.zero(req.offset, len),
            IoOp::Read | IoOp::Write { .. } => {
                let len = req.iov.len();
                self.check(req.offset, len)?;
                let ours = &mut self.ram[req.offset as usize..(req.offset + len) as usize];
                match req.op {
                    IoOp::Read => req.iov.copy_from_slice(ours),
                    _ => req.iov.copy_to_slice(ours),
                };
                Ok(())
            }
        };
        self.done.push(req.tag, st.err().unwrap_or(Status::SUCCESS));
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::tests::{read, run, write};

    /// A kept memfd's second backend reads what the first wrote; Deallocate and Write
    /// Zeroes read back as zeroes through both.
    #[test]
    fn kept_ram_outlives_its_backend() {
        use std::os::fd::AsFd;
        let fd = sys_util::kept_ram::create(c"test-ns", 1 << 20).unwrap();
        let again = || fd.as_fd().try_clone_to_owned().unwrap();
        let mut b = MallocBackend::kept(again(), 1 << 20).unwrap();
        crate::backend::tests::exercise(&mut b);
        assert_eq!(write(&mut b, 65536, &[0x5a; 3 * 4096]), Status::SUCCESS);
        assert_eq!(
            run(&mut b, IoOp::Deallocate { len: 4096 }, 69632, None),
            Status::SUCCESS
        );
        drop(b);
        let mut b = MallocBackend::kept(again(), 1 << 20).unwrap();
        let mut back = vec![0u8; 3 * 4096];
        assert_eq!(read(&mut b, 65536, &mut back), Status::SUCCESS);
        assert!(back[..4096].iter().all(|&x| x == 0x5a));
        assert!(back[4096..8192].iter().all(|&x| x == 0), "deallocated");
        assert!(back[8192..].iter().all(|&x| x == 0x5a));
        assert!(
            MallocBackend::kept(again(), 2 << 20).is_err(),
            "another size"
        );
    }

    #[test]
    fn round_trip() {
        let mut b = MallocBackend::new(1 << 20).unwrap();
        crate::backend::tests::exercise(&mut b);
    }

    /// Deallocate and Write Zeroes over ranges that start and end inside pages: whole
    /// pages are released, the partial ones cleared, the bytes around untouched; a Flush
    /// succeeds; out of range fails.
    #[test]
    fn zeroes_unaligned_ranges_exactly() {
        let mut b = MallocBackend::new(1 << 20).unwrap();
        for (op, offset, len) in [
            (IoOp::Deallocate { len: 0 }, 512u64, 3 * 4096 + 1024u64),
            (IoOp::WriteZeroes { len: 0 }, 4096 + 512, 1024),
            (IoOp::Deallocate { len: 0 }, 8192, 8192),
        ] {
            assert_eq!(write(&mut b, 0, &vec![0xa5; 8 * 4096]), Status::SUCCESS);
            let op = match op {
                IoOp::Deallocate { .. } => IoOp::Deallocate { len },
                _ => IoOp::WriteZeroes { len },
            };
            assert_eq!(run(&mut b, op, offset, None), Status::SUCCESS);
            let mut back = vec![0u8; 8 * 4096];
            assert_eq!(read(&mut b, 0, &mut back), Status::SUCCESS);
            for (i, &x) in back.iter().enumerate() {
                let zeroed = (offset..offset + len).contains(&(i as u64));
                assert_eq!(
                    x,
                    if zeroed { 0 } else { 0xa5 },
                    "{op:?} at {offset}: byte {i}"
                );
            }
        }
        assert_eq!(run(&mut b, IoOp::Flush, 0, None), Status::SUCCESS);
        assert_eq!(
            run(
                &mut b,
                IoOp::Deallocate { len: 8192 },
                (1 << 20) - 4096,
                None
            ),
            Status::LBA_OUT_OF_RANGE
        );
    }
}
