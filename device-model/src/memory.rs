//! Guest memory as the client maps it to us: DMA regions backed by file descriptors
//! (vfio-user DMA_MAP), mmapped into this process and looked up by IOVA.
//!
//! The map changes while queues are live (SeaBIOS remaps all of RAM after NVMe setup), so the
//! data plane never caches host pointers across map changes: it loads a [`MemoryMap`] snapshot
//! (lock-free, `arc-swap`) and translates addresses through it (a queue's ring is found once
//! per snapshot, [`crate::ring_view`]). A region stays mapped for
//! as long as any snapshot holding it is alive, so in-flight I/O never touches unmapped memory.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use arc_swap::ArcSwap;

/// Errors from building or changing the DMA map.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    #[error("DMA region iova={iova:#x} size={size:#x} is empty or wraps around")]
    BadRange { iova: u64, size: u64 },
    #[error("DMA region iova={iova:#x} size={size:#x} overlaps an existing mapping")]
    Overlap { iova: u64, size: u64 },
    #[error("DMA unmap iova={iova:#x} size={size:#x} splits an existing mapping")]
    PartialUnmap { iova: u64, size: u64 },
    #[error("DMA unmap iova={iova:#x} size={size:#x} matches no mapping")]
    NotMapped { iova: u64, size: u64 },
    #[error("too many DMA regions (limit {0})")]
    TooMany(usize),
    #[error("mmap of DMA region failed: {0}")]
    Mmap(i32),
    #[error("DMA region fd is not a regular file or memfd ({0})")]
    NotAFile(&'static str),
    #[error(
        "DMA region {offset:#x}+{size:#x} lies past the end of its file ({file_size:#x} bytes)"
    )]
    PastEnd {
        offset: u64,
        size: u64,
        file_size: u64,
    },
}

/// Guest access rights of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protection {
    pub read: bool,
    pub write: bool,
}

/// One region of a client's file mapped into this process (rust-vmm's `vm-memory`
/// `MmapRegion`: it owns the mapping and a duplicate of the fd, so the region can be handed
/// on, e.g. to a backend device's DMA map), with its SIGBUS containment.
struct Mapping {
    region: vm_memory::MmapRegion,
    /// Released before `region` unmaps (see Drop).
    fault_guard: Option<crate::memory_fault::Guard>,
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("len", &self.region.size())
            .finish_non_exhaustive()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // unregister first: the range must not be treated as guest memory once unmapped
        drop(self.fault_guard.take());
    }
}

/// A DMA region: `[iova, iova + len)` of guest address space backed by host memory.
#[derive(Clone, Debug)]
pub struct Region {
    pub iova: u64,
    pub len: u64,
    pub prot: Protection,
    mapping: Option<Arc<Mapping>>,
}

/// An immutable snapshot of the DMA map, sorted by IOVA.
#[derive(Clone, Debug, Default)]
pub struct MemoryMap {
    regions: Vec<Region>,
}

/// Why a guest address could not be accessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("guest address {iova:#x}+{len:#x} is not mapped for {}", if *write { "write" } else { "read" })]
pub struct AccessError {
    pub iova: u64,
    pub len: u64,
    pub write: bool,
}

/// How a region is backed in this process: our mapping and the file it maps.
#[derive(Clone, Copy, Debug)]
pub struct Backing<'a> {
    /// Our address of the region's first byte.
    pub host: *mut u8,
    pub len: u64,
    pub fd: BorrowedFd<'a>,
    pub file_offset: u64,
}

impl Region {
    /// The region's backing, if it has one (fd-less regions are not accessible).
    pub fn backing(&self) -> Option<Backing<'_>> {
        let m = self.mapping.as_ref()?;
        let file = m.region.file_offset()?;
        Some(Backing {
            host: m.region.as_ptr(),
            len: self.len,
            fd: std::os::fd::AsFd::as_fd(file.file()),
            file_offset: file.start(),
        })
    }

    /// The bytes `[off, off + len)` of this region as a volatile slice (bounds checked).
    fn slice(&self, off: u64, len: u64) -> Option<vm_memory::VolatileSlice<'_, ()>> {
        use vm_memory::VolatileMemory;
        let m = self.mapping.as_ref()?;
        m.region
            .get_slice(usize::try_from(off).ok()?, usize::try_from(len).ok()?)
            .ok()
    }
}

impl MemoryMap {
    /// The regions, sorted by IOVA.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Host pointer for `[iova, iova+len)`, which must lie inside one region with the right
    /// protection. `len` may be zero only if `iova` is inside a region.
    pub fn translate(&self, iova: u64, len: u64, write: bool) -> Result<*mut u8, AccessError> {
        let (r, off) = self.region_for(iova, len, write)?;
        let m = r.mapping.as_ref().ok_or(AccessError { iova, len, write })?;
        // off < r.len: the result stays inside the mapping
        Ok(m.region.as_ptr().wrapping_add(off as usize))
    }

    /// The region holding all of `[iova, iova + len)` with the access right, and the offset.
    fn region_for(&self, iova: u64, len: u64, write: bool) -> Result<(&Region, u64), AccessError> {
        let (r, off, chunk) = self.chunk_at(iova, len, write)?;
        if chunk < len {
            return Err(AccessError { iova, len, write });
        }
        Ok((r, off))
    }

    /// The region holding `iova` (with the access right), the offset in it, and how many of
    /// the `len` bytes from `iova` lie in it: one lookup for each piece of a copy.
    #[inline]
    fn chunk_at(
        &self,
        iova: u64,
        len: u64,
        write: bool,
    ) -> Result<(&Region, u64, u64), AccessError> {
        let (r, off) = self.locate(iova, len, write)?;
        if (write && !r.prot.write) || (!write && !r.prot.read) {
            return Err(AccessError { iova, len, write });
        }
        Ok((r, off, len.min(r.len - off)))
    }

    /// The region containing `iova` and the offset in it (`len` and `write` only describe
    /// the access in the error).
    #[inline]
    fn locate(&self, iova: u64, len: u64, write: bool) -> Result<(&Region, u64), AccessError> {
        let err = AccessError { iova, len, write };
        let idx = self.regions.partition_point(|r| r.iova <= iova);
        let r = idx.checked_sub(1).map(|i| &self.regions[i]).ok_or(err)?;
        let off = iova - r.iova;
        if off >= r.len {
            return Err(err);
        }
        Ok((r, off))
    }

    /// Copy guest memory at `iova` into `buf` (may span adjacent regions).
    pub fn read(&self, mut iova: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let mut done = 0;
        while done < buf.len() {
            let (r, off, chunk) = self.chunk_at(iova, (buf.len() - done) as u64, false)?;
            let err = AccessError {
                iova,
                len: chunk,
                write: false,
            };
            // volatile copy: guest memory may change concurrently, no reference is formed
            let src = r.slice(off, chunk).ok_or(err)?;
            src.copy_to(&mut buf[done..done + chunk as usize]);
            done += chunk as usize;
            iova += chunk;
        }
        Ok(())
    }

    /// Copy `data` into guest memory at `iova` (may span adjacent regions).
    pub fn write(&self, mut iova: u64, data: &[u8]) -> Result<(), AccessError> {
        let mut done = 0;
        while done < data.len() {
            let (r, off, chunk) = self.chunk_at(iova, (data.len() - done) as u64, true)?;
            let err = AccessError {
                iova,
                len: chunk,
                write: true,
            };
            r.slice(off, chunk)
                .ok_or(err)?
                .copy_from(&data[done..done + chunk as usize]);
            done += chunk as usize;
            iova += chunk;
        }
        Ok(())
    }

    /// Check that all of `[iova, iova+len)` is mapped (possibly over adjacent regions).
    pub fn check_range(&self, mut iova: u64, mut len: u64, write: bool) -> Result<(), AccessError> {
        while len > 0 {
            let (_, _, chunk) = self.chunk_at(iova, len, write)?;
            iova += chunk;
            len -= chunk;
        }
        Ok(())
    }

    /// Host pointer of `iova` and how many of the `len` bytes from it lie in its region,
    /// which must grant the access: one lookup per piece of a scatter list.
    #[inline]
    pub fn host_chunk(
        &self,
        iova: u64,
        len: u64,
        write: bool,
    ) -> Result<(*mut u8, u64), AccessError> {
        let (r, off, chunk) = self.chunk_at(iova, len, write)?;
        let m = r.mapping.as_ref().ok_or(AccessError { iova, len, write })?;
        // off < r.len: the result stays inside the mapping
        Ok((m.region.as_ptr().wrapping_add(off as usize), chunk))
    }

    fn overlaps(&self, iova: u64, end: u64) -> bool {
        self.regions
            .iter()
            .any(|r| r.iova < end && iova < r.iova + r.len)
    }
}

/// A DMA_MAP fd must be a regular file (memfd, tmpfs, hugetlbfs: all S_IFREG) that holds
/// `[offset, offset + size)` at map time; a pipe, socket or device, or a range past the end
/// (a 4 KiB memfd announced as 1 GiB), is refused before anything is mapped.
fn check_backing_file(fd: BorrowedFd<'_>, offset: u64, size: u64) -> Result<(), MapError> {
    // SAFETY: a zeroed stat is valid output space; fstat on a descriptor we borrow.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &raw mut st) != 0 {
            return Err(MapError::NotAFile("fstat failed"));
        }
        st
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(MapError::NotAFile(match st.st_mode & libc::S_IFMT {
            libc::S_IFIFO => "a pipe",
            libc::S_IFSOCK => "a socket",
            libc::S_IFCHR | libc::S_IFBLK => "a device",
            libc::S_IFDIR => "a directory",
            _ => "not a regular file",
        }));
    }
    let file_size = u64::try_from(st.st_size).unwrap_or(0);
    match offset.checked_add(size) {
        Some(end) if end <= file_size => Ok(()),
        _ => Err(MapError::PastEnd {
            offset,
            size,
            file_size,
        }),
    }
}

/// The live DMA map shared by the control plane (writer) and the data plane (readers).
#[derive(Debug, Default)]
pub struct GuestMemory {
    map: ArcSwap<MemoryMap>,
    /// Bumped after every change of `map` ([`GuestMemory::version`]).
    version: std::sync::atomic::AtomicU64,
}

/// DMA regions a client may create unless the daemon sets a budget ([`set_max_regions`]).
pub const MAX_REGIONS: usize = 1024;

static REGION_LIMIT: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(MAX_REGIONS);

/// Upper bound on DMA regions one client may create (advertised as max_dma_maps). Each
/// region holds one duplicated fd, so the daemon sizes this from RLIMIT_NOFILE so that every
/// tenant can reach its limit at once.
pub fn max_regions() -> usize {
    REGION_LIMIT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Set the per-client DMA region limit (at most [`MAX_REGIONS`], at least 1).
pub fn set_max_regions(n: usize) {
    REGION_LIMIT.store(
        n.clamp(1, MAX_REGIONS),
        std::sync::atomic::Ordering::Relaxed,
    );
}

impl GuestMemory {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current snapshot (lock-free).
    pub fn snapshot(&self) -> Arc<MemoryMap> {
        self.map.load_full()
    }

    /// A number that changes after every change of the map (one atomic load): a reader that
    /// took a snapshot at version `v` may keep using it while the version is still `v`.
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Make `next` the current map, then bump the version.
    fn publish(&self, next: MemoryMap) {
        self.map.store(Arc::new(next));
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Borrow the current snapshot without touching the reference count (hot path).
    pub fn load(&self) -> arc_swap::Guard<Arc<MemoryMap>> {
        self.map.load()
    }

    /// Map `size` bytes of `fd` at `offset` as guest IOVA `iova`.
    ///
    /// The fd must be a regular file (memfd, tmpfs, hugetlbfs) holding the whole range now;
    /// if its owner shrinks it later, [`crate::memory_fault`] keeps the daemon alive.
    pub fn map_fd(
        &self,
        iova: u64,
        size: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        prot: Protection,
    ) -> Result<(), MapError> {
        self.check_new(iova, size)?;
        let len = usize::try_from(size).map_err(|_| MapError::BadRange { iova, size })?;
        libc::off_t::try_from(offset).map_err(|_| MapError::BadRange { iova, size })?;
        check_backing_file(fd, offset, size)?;
        let mut p = 0;
        if prot.read {
            p |= libc::PROT_READ;
        }
        if prot.write {
            p |= libc::PROT_WRITE;
        }
        let file = fd
            .try_clone_to_owned()
            .map_err(|e| MapError::Mmap(e.raw_os_error().unwrap_or(0)))?;
        let region = vm_memory::mmap::MmapRegionBuilder::new(len)
            .with_file_offset(vm_memory::FileOffset::new(
                std::fs::File::from(file),
                offset,
            ))
            .with_mmap_prot(p)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(|e| {
                MapError::Mmap(match e {
                    vm_memory::mmap::MmapRegionError::Mmap(e) => e.raw_os_error().unwrap_or(0),
                    _ => libc::EINVAL,
                })
            })?;
        let fault_guard = crate::memory_fault::register(region.as_ptr() as usize, len);
        if fault_guard.is_none() {
            return Err(MapError::TooMany(max_regions()));
        }
        self.insert(Region {
            iova,
            len: size,
            prot,
            mapping: Some(Arc::new(Mapping {
                region,
                fault_guard,
            })),
        });
        Ok(())
    }

    /// Record a region the client mapped without a file descriptor (ROM, other devices'
    /// BARs): it is known, so its unmap succeeds, but any access to it fails (we do not
    /// implement DMA_READ/WRITE), which the command that tried gets as a data transfer error.
    pub fn map_inaccessible(&self, iova: u64, size: u64) -> Result<(), MapError> {
        self.check_new(iova, size)?;
        let none = Protection {
            read: false,
            write: false,
        };
        self.insert(Region {
            iova,
            len: size,
            prot: none,
            mapping: None,
        });
        Ok(())
    }

    /// A new region must be non-empty, not wrap, fit the region limit and overlap nothing.
    fn check_new(&self, iova: u64, size: u64) -> Result<(), MapError> {
        let end = iova
            .checked_add(size)
            .filter(|_| size > 0)
            .ok_or(MapError::BadRange { iova, size })?;
        let cur = self.map.load();
        if cur.regions.len() >= max_regions() {
            return Err(MapError::TooMany(max_regions()));
        }
        if cur.overlaps(iova, end) {
            return Err(MapError::Overlap { iova, size });
        }
        Ok(())
    }

    fn insert(&self, region: Region) {
        let mut next = (**self.map.load()).clone();
        let at = next.regions.partition_point(|r| r.iova < region.iova);
        next.regions.insert(at, region);
        self.publish(next);
    }

    /// Remove every region inside `[iova, iova+size)`; a region only partly inside is an error.
    pub fn unmap(&self, iova: u64, size: u64) -> Result<usize, MapError> {
        let end = iova
            .checked_add(size)
            .ok_or(MapError::BadRange { iova, size })?;
        let cur = self.map.load();
        let mut next = MemoryMap::default();
        let mut removed = 0;
        for r in &cur.regions {
            let r_end = r.iova + r.len;
            let inside = r.iova >= iova && r_end <= end;
            let touches = r.iova < end && iova < r_end;
            if inside {
                removed += 1;
            } else if touches {
                return Err(MapError::PartialUnmap { iova, size });
            } else {
                next.regions.push(r.clone());
            }
        }
        if removed == 0 {
            return Err(MapError::NotMapped { iova, size });
        }
        self.publish(next);
        Ok(removed)
    }

    /// Drop every region (client gone).
    pub fn clear(&self) {
        self.publish(MemoryMap::default());
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    /// A memfd of `size` bytes for tests.
    pub(crate) fn memfd(size: u64) -> OwnedFd {
        // SAFETY: memfd_create with a static NUL-terminated name; result checked.
        let fd = unsafe { libc::memfd_create(c"test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh, owned descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own fd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
        fd
    }

    const RW: Protection = Protection {
        read: true,
        write: true,
    };

    #[test]
    fn maps_translates_and_rejects_out_of_range() {
        let m = GuestMemory::new();
        let fd = memfd(0x4000);
        m.map_fd(0x10000, 0x2000, fd.as_fd(), 0, RW).unwrap();
        m.map_fd(0x12000, 0x2000, fd.as_fd(), 0x2000, RW).unwrap();
        let snap = m.snapshot();
        snap.write(0x11ff0, &[7u8; 32]).unwrap(); // spans both regions
        let mut b = [0u8; 32];
        snap.read(0x11ff0, &mut b).unwrap();
        assert_eq!(b, [7u8; 32]);
        assert!(snap.read(0x13ff0, &mut b).is_err());
        assert!(snap.translate(0xffff, 1, false).is_err());
        assert!(snap.translate(u64::MAX, 2, false).is_err());
        assert_eq!(
            m.map_fd(0x11000, 0x1000, fd.as_fd(), 0, RW),
            Err(MapError::Overlap {
                iova: 0x11000,
                size: 0x1000
            })
        );
        assert!(matches!(
            m.map_fd(u64::MAX - 1, 0x1000, fd.as_fd(), 0, RW),
            Err(MapError::BadRange { .. })
        ));
    }

    #[test]
    fn unmap_whole_regions_only_and_snapshots_stay_valid() {
        let m = GuestMemory::new();
        let fd = memfd(0x4000);
        m.map_fd(0, 0x4000, fd.as_fd(), 0, RW).unwrap();
        let old = m.snapshot();
        assert_eq!(
            m.unmap(0x1000, 0x1000),
            Err(MapError::PartialUnmap {
                iova: 0x1000,
                size: 0x1000
            })
        );
        assert_eq!(m.unmap(0, 0x4000), Ok(1));
        assert!(m.snapshot().translate(0, 1, false).is_err());
        old.write(0, &[1]).unwrap(); // the old snapshot keeps its mapping alive
        assert_eq!(
            m.unmap(0, 0x4000),
            Err(MapError::NotMapped {
                iova: 0,
                size: 0x4000
            })
        );
    }

    #[test]
    fn fdless_region_is_known_but_inaccessible() {
        let m = GuestMemory::new();
        m.map_inaccessible(0xc0000, 0x20000).unwrap();
        assert!(m.snapshot().read(0xc0000, &mut [0]).is_err());
        assert!(m.snapshot().write(0xc0000, &[0]).is_err());
        assert_eq!(m.unmap(0xc0000, 0x20000), Ok(1));
    }

    #[test]
    fn read_only_region_refuses_writes() {
        let m = GuestMemory::new();
        let fd = memfd(0x1000);
        m.map_fd(
            0,
            0x1000,
            fd.as_fd(),
            0,
            Protection {
                read: true,
                write: false,
            },
        )
        .unwrap();
        assert!(m.snapshot().write(0, &[1]).is_err());
        assert!(m.snapshot().read(0, &mut [0]).is_ok());
    }
}
