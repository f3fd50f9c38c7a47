//! The malloc backend: a namespace in RAM (SPDK's bdev_malloc): anonymous memory, or a
//! memfd another process keeps (a supervised worker's, [`MallocBackend::kept`]).

use nvme_spec::Status;

use super::written_pages::WrittenPages;
use super::{Backend, DoneQueue, IoOp, IoRequest, Submitted};

/// A RAM namespace; contents are lost when the process exits, unless its memfd is kept by
/// another ([`MallocBackend::kept`]).
pub struct MallocBackend {
    ram: memmap2::MmapMut,
    size: u64,
    /// In a kept memfd (pages are released by punching holes, not dropped from a private
    /// mapping).
    kept: bool,
    /// In a kept memfd: the pages that may hold data. A read of the others is served as
    /// zeroes without touching them (through the shared mapping it would allocate them).
    written: Option<WrittenPages>,
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
            written: None,
            done: DoneQueue::default(),
        })
    }

    /// The RAM of memfd `fd`, which must hold exactly `size` bytes and is kept by another
    /// process (a supervisor) across the lives of those that map it: what an earlier one
    /// wrote is read back.
    pub fn kept(fd: std::os::fd::OwnedFd, size: u64) -> Result<Self, MallocError> {
        use std::os::fd::AsFd;
        let written = written_in(fd.as_fd(), 0, size)?;
        let ram =
            sys_util::kept_ram::map(fd, size).map_err(|source| MallocError { size, source })?;
        Ok(Self::on_kept(ram, size, written))
    }

    /// `size` bytes of RAM at `offset` of memfd `fd`, which another process keeps (a
    /// namespace of a kept pool: one memfd, a range per namespace).
    pub fn kept_range(
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        size: u64,
    ) -> Result<Self, MallocError> {
        let written = written_in(fd, offset, size)?;
        let ram = sys_util::kept_ram::map_range(fd, offset, size)
            .map_err(|source| MallocError { size, source })?;
        Ok(Self::on_kept(ram, size, written))
    }

    /// A namespace on `ram`, a mapping of kept RAM whose pages `written` may hold data.
    fn on_kept(ram: memmap2::MmapMut, size: u64, written: WrittenPages) -> Self {
        Self {
            ram,
            size,
            kept: true,
            written: Some(written),
            done: DoneQueue::default(),
        }
    }

    /// Serve a read of `[offset, offset + len)` that touches never-written pages: those as
    /// zeroes, the rest from the RAM.
    fn read_sparse(&self, req: &IoRequest<'_>, offset: u64, len: u64) {
        let Some(w) = &self.written else {
            return;
        };
        w.runs(offset, offset + len, |a, b, written| {
            let at = (a - offset) as usize;
            if written {
                req.iov.write_at(at, &self.ram[a as usize..b as usize]);
            } else {
                let zeroes = sys_util::zeroes();
                let mut done = 0;
                while done < (b - a) as usize {
                    let n = ((b - a) as usize - done).min(zeroes.len());
                    req.iov.write_at(at + done, &zeroes[..n]);
                    done += n;
                }
            }
        });
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
            if let Some(w) = self.written.as_mut() {
                w.clear(inner_start, inner_end);
            }
            [(start, inner_start), (inner_end, end)]
        } else {
            [(start, end), (end, end)]
        };
        for (a, b) in pieces {
            // a page never written is zeroes already (and stays unallocated)
            if a < b && self.written.as_ref().is_none_or(|w| !w.none(a, b)) {
                self.ram[a as usize..b as usize].fill(0);
            }
        }
        Ok(())
    }
}

/// The pages of `[offset, offset + size)` of kept RAM `fd` that hold data, as a page map of
/// the namespace (from 0).
fn written_in(
    fd: std::os::fd::BorrowedFd<'_>,
    offset: u64,
    size: u64,
) -> Result<WrittenPages, MallocError> {
    let page = sys_util::anonymous::page_size() as u64;
    let mut w = WrittenPages::new(size, page);
    let ranges = sys_util::kept_ram::data_ranges(fd, offset, offset.saturating_add(size))
        .map_err(|source| MallocError { size, source })?;
    for (a, b) in ranges {
        w.mark(a - offset, b - offset);
    }
    Ok(w)
}

impl Backend for MallocBackend {
    fn describe(&self) -> String {
        format!("malloc:{}MiB", self.size >> 20)
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), Status> {
        // a read or write out of range is not started; the rest is done now and reported
        // by the next poll (RAM is instant)
        if matches!(req.op, IoOp::Read | IoOp::Write { .. }) {
            self.check(req.offset, req.iov.len())?;
        }
        let st = self.execute(req).err().unwrap_or(Status::SUCCESS);
        self.done.push(req.tag, st);
        Ok(())
    }
    fn execute(&mut self, req: &IoRequest<'_>) -> Result<Submitted, Status> {
        let st = match req.op {
            IoOp::Flush => Ok(()),
            IoOp::WriteZeroes { len } | IoOp::Deallocate { len } => self.zero(req.offset, len),
            IoOp::Read | IoOp::Write { .. } => {
                let len = req.iov.len();
                self.check(req.offset, len)?;
                let (start, end) = (req.offset, req.offset + len);
                let sparse = matches!(req.op, IoOp::Read)
                    && self.written.as_ref().is_some_and(|w| !w.all(start, end));
                if sparse {
                    self.read_sparse(req, start, len);
                } else {
                    let ours = &mut self.ram[start as usize..end as usize];
                    match req.op {
                        IoOp::Read => req.iov.copy_from_slice(ours),
                        _ => req.iov.copy_to_slice(ours),
                    };
                    if let (IoOp::Write { .. }, Some(w)) = (&req.op, self.written.as_mut()) {
                        w.mark(start, end);
                    }
                }
                Ok(())
            }
        };
        st.map(|()| Submitted::Completed)
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

    /// Reading never-written kept RAM returns zeroes without allocating it (a read of a hole
    /// through a shared mapping would); what is written reads back, through the next
    /// backend too (its page map comes from the memfd's data ranges); deallocated, the
    /// memory goes.
    #[test]
    fn reading_unwritten_kept_ram_allocates_nothing() {
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let fd = sys_util::kept_ram::create(c"test-sparse", 1 << 20).unwrap();
        let again = || fd.as_fd().try_clone_to_owned().unwrap();
        let blocks = || std::fs::File::from(again()).metadata().unwrap().blocks();
        let mut b = MallocBackend::kept(again(), 1 << 20).unwrap();
        let mut back = vec![0xffu8; 64 << 10];
        assert_eq!(read(&mut b, 0, &mut back), Status::SUCCESS);
        assert!(back.iter().all(|&x| x == 0));
        assert_eq!(blocks(), 0, "a read allocated kept RAM");
        assert_eq!(write(&mut b, 8192, &[7; 4096]), Status::SUCCESS);
        assert!(blocks() > 0);
        let mut back = vec![0xffu8; 3 * 4096];
        assert_eq!(read(&mut b, 4096 + 512, &mut back), Status::SUCCESS);
        assert!(back[..4096 - 512].iter().all(|&x| x == 0));
        assert!(back[4096 - 512..2 * 4096 - 512].iter().all(|&x| x == 7));
        assert!(back[2 * 4096 - 512..].iter().all(|&x| x == 0));
        drop(b);
        let mut b = MallocBackend::kept(again(), 1 << 20).unwrap();
        let mut page = vec![0u8; 4096];
        assert_eq!(read(&mut b, 8192, &mut page), Status::SUCCESS);
        assert!(page.iter().all(|&x| x == 7), "the next backend reads it");
        assert_eq!(
            run(&mut b, IoOp::Deallocate { len: 4096 }, 8192, None),
            Status::SUCCESS
        );
        assert_eq!(read(&mut b, 8192, &mut page), Status::SUCCESS);
        assert!(page.iter().all(|&x| x == 0));
        assert_eq!(blocks(), 0, "deallocated: its memory went");
    }

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
