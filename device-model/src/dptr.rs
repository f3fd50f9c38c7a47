//! Data pointers: walk a command's PRPs (NVMe base 2.0 §4.3.1) or SGL (§4.3.2) into host
//! iovecs over guest memory. Every address the guest gives is checked against the DMA map;
//! contiguous pages are merged. No allocation: the iovec array is fixed-size.

use nvme_spec::command::{SglDescriptor, sgl_type};
use nvme_spec::{Status, Submission};
use std::sync::Arc;
use zerocopy::FromBytes;

use crate::memory::MemoryMap;

/// Most host segments one command may need after merging (Linux sends at most 128).
pub const MAX_IOV: usize = 256;

/// Storage for one command's iovecs (4 KiB). Command slots borrow one from their
/// controller's pool only while a command is in flight, so daemon memory follows the cap on
/// commands in flight, not the queue sizes a guest chooses.
pub type IoVecBlock = Box<[libc::iovec; MAX_IOV]>;

/// A new, empty iovec block.
pub fn iovec_block() -> IoVecBlock {
    Box::new(
        [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOV],
    )
}

/// Spare iovec blocks of one controller (lent to commands while they are in flight).
#[derive(Default)]
pub struct IoVecPool(Vec<IoVecBlock>);

// SAFETY: spare blocks hold no live pointers (a block's contents are dead once returned; the
// next user overwrites them before use).
unsafe impl Send for IoVecPool {}

impl IoVecPool {
    /// A block: a spare one, or a new one.
    pub fn take(&mut self) -> IoVecBlock {
        self.0.pop().unwrap_or_else(iovec_block)
    }
    /// Give a block back.
    pub fn put(&mut self, block: IoVecBlock) {
        self.0.push(block);
    }
}

/// A command's data buffer as host iovecs over guest memory.
pub struct IoVecs {
    iov: Option<IoVecBlock>,
    /// The one segment while there is no storage: most commands (4 KiB to an aligned
    /// buffer) need no block lent.
    one: libc::iovec,
    /// Segments used (at most [`MAX_IOV`]).
    n: u32,
    len: u64,
    /// A segment found no room without storage: lend it storage and walk again.
    short: bool,
}

/// No segment.
const NO_IOVEC: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

// SAFETY: the iovecs point into guest memory mappings kept alive by the command's memory
// snapshot, or into a buffer the command's slot owns ([`IoVecs::set_buffer`]); they are only
// dereferenced by the thread that owns the command.
unsafe impl Send for IoVecs {}

impl Default for IoVecs {
    /// With storage of its own.
    fn default() -> Self {
        Self {
            iov: Some(iovec_block()),
            one: NO_IOVEC,
            n: 0,
            len: 0,
            short: false,
        }
    }
}

impl std::fmt::Debug for IoVecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoVecs")
            .field("n", &self.n)
            .field("len", &self.len)
            .finish()
    }
}

impl IoVecs {
    /// Without storage: room for one segment until [`IoVecs::give_storage`].
    pub fn empty() -> Self {
        Self {
            iov: None,
            one: NO_IOVEC,
            n: 0,
            len: 0,
            short: false,
        }
    }
    /// True when the last walk needed more than the one segment there is room for without
    /// storage (it failed): lend storage and walk again.
    pub fn needs_storage(&self) -> bool {
        self.short
    }
    /// True when it has storage to fill.
    pub fn has_storage(&self) -> bool {
        self.iov.is_some()
    }
    /// Lend it storage.
    pub fn give_storage(&mut self, block: IoVecBlock) {
        self.clear();
        self.iov = Some(block);
    }
    /// Take its storage back (it is then empty).
    pub fn take_storage(&mut self) -> Option<IoVecBlock> {
        self.clear();
        self.iov.take()
    }
    /// Describe `buf`, a buffer of the daemon's (a Compare's media read), instead of guest
    /// memory.
    ///
    /// # Safety
    /// `buf` must stay allocated, and not be accessed through Rust references, until the
    /// request submitted with these iovecs is reported complete by its backend (or for
    /// good, if it never is).
    pub(crate) unsafe fn set_buffer(&mut self, buf: &mut [u8]) -> Result<(), Status> {
        self.clear();
        self.push(buf.as_mut_ptr(), buf.len() as u64)
    }
    /// Forget the current contents.
    pub fn clear(&mut self) {
        self.n = 0;
        self.len = 0;
        self.short = false;
    }
    /// The segments.
    #[inline]
    pub fn as_slice(&self) -> &[libc::iovec] {
        match self.iov.as_deref() {
            Some(v) => &v[..self.n as usize],
            None => &std::slice::from_ref(&self.one)[..self.n as usize],
        }
    }
    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// True when no bytes are described.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, base: *mut u8, len: u64) -> Result<(), Status> {
        if len == 0 {
            return Ok(());
        }
        let iov: &mut [libc::iovec] = match self.iov.as_deref_mut() {
            Some(v) => v,
            None => std::slice::from_mut(&mut self.one),
        };
        if self.n > 0 {
            let last = &mut iov[self.n as usize - 1];
            if (last.iov_base as usize).wrapping_add(last.iov_len) == base as usize {
                last.iov_len += len as usize;
                self.len += len;
                return Ok(());
            }
        }
        if self.n as usize == iov.len() {
            if iov.len() < MAX_IOV {
                self.short = true;
                return Err(Status::INTERNAL_ERROR);
            }
            return Err(Status::INVALID_SGL_COUNT);
        }
        iov[self.n as usize] = libc::iovec {
            iov_base: base.cast(),
            iov_len: len as usize,
        };
        self.n += 1;
        self.len += len;
        Ok(())
    }

    /// Describe exactly `[iova, iova + len)` (non-empty, inside one region) of guest memory.
    #[inline]
    fn set_guest_one(
        &mut self,
        mem: &MemoryMap,
        iova: u64,
        len: u64,
        write: bool,
    ) -> Result<(), Status> {
        let (p, chunk) = mem
            .host_chunk(iova, len, write)
            .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
        if chunk < len {
            // a page across two adjacent regions
            return self.push_guest(mem, iova, len, write);
        }
        let first = match self.iov.as_deref_mut() {
            Some(v) => &mut v[0],
            None => &mut self.one,
        };
        *first = libc::iovec {
            iov_base: p.cast(),
            iov_len: len as usize,
        };
        self.n = 1;
        self.len = len;
        Ok(())
    }

    fn push_guest(
        &mut self,
        mem: &MemoryMap,
        mut iova: u64,
        mut len: u64,
        write: bool,
    ) -> Result<(), Status> {
        while len > 0 {
            let (p, chunk) = mem
                .host_chunk(iova, len, write)
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
            self.push(p, chunk)?;
            iova += chunk;
            len -= chunk;
        }
        Ok(())
    }

    /// The buffer as a handle for a backend (safe copies; raw iovecs only through an
    /// `unsafe` accessor).
    #[inline]
    pub fn buffers(&self) -> GuestBuffers<'_> {
        GuestBuffers {
            iov: self.as_slice(),
            len: self.len,
            keep: None,
        }
    }

    /// The segments as buffers in `mem` (the snapshot they were built against): lists taken
    /// from them keep that memory mapped.
    #[inline]
    pub fn buffers_in<'a>(&'a self, mem: &'a Arc<MemoryMap>) -> GuestBuffers<'a> {
        GuestBuffers {
            keep: Some(mem),
            ..self.buffers()
        }
    }

    /// Copy `data` into the buffer (controller-to-host transfer); returns bytes copied.
    pub fn copy_from_slice(&self, data: &[u8]) -> usize {
        self.buffers().copy_from_slice(data)
    }

    /// Copy the buffer into `out` (host-to-controller transfer); returns bytes copied.
    pub fn copy_to_slice(&self, out: &mut [u8]) -> usize {
        self.buffers().copy_to_slice(out)
    }
}

/// A command's data buffers in guest (or a device's) memory, as handed to a backend.
///
/// Safe code gets the bytes only as copies ([`copy_from_slice`](Self::copy_from_slice),
/// [`read_at`](Self::read_at), ...), never a Rust reference: the guest may change the memory
/// at any time. Addresses are available as plain numbers ([`segments`](Self::segments)) for
/// address arithmetic, and as iovecs only through the `unsafe`
/// [`as_raw_iovecs`](Self::as_raw_iovecs) for a syscall or a device's DMA.
///
/// The memory stays mapped until the backend that got the request reports it complete (the
/// controller's command slot keeps its memory snapshot until then), and for as long as a
/// [`GuestBufferList`] taken from the buffers exists: the list holds the same snapshot. A
/// backend must still not touch them after it reported the request complete (the guest owns
/// the memory again), but no use of a list can reach unmapped memory.
#[derive(Clone, Copy)]
pub struct GuestBuffers<'a> {
    iov: &'a [libc::iovec],
    len: u64,
    /// The guest memory snapshot the iovecs point into, when they came from the controller.
    keep: Option<&'a Arc<MemoryMap>>,
}

impl std::fmt::Debug for GuestBuffers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestBuffers")
            .field("segments", &self.iov.len())
            .field("len", &self.len)
            .finish()
    }
}

impl Default for GuestBuffers<'_> {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl<'a> GuestBuffers<'a> {
    /// No buffers (Flush).
    pub const EMPTY: GuestBuffers<'static> = GuestBuffers {
        iov: &[],
        len: 0,
        keep: None,
    };

    /// Buffers described by raw iovecs.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for reads and writes of its whole length,
    /// not accessed through Rust references while any copy of this handle (or a
    /// [`GuestBufferList`] taken from it) is in use: until the request it is submitted with
    /// is reported complete by its backend.
    pub unsafe fn from_raw_iovecs(iov: &'a [libc::iovec]) -> Self {
        Self {
            iov,
            len: iov.iter().map(|v| v.iov_len as u64).sum(),
            keep: None,
        }
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when no bytes are described.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of segments.
    pub fn segment_count(&self) -> usize {
        self.iov.len()
    }

    /// The guest memory snapshot the segments were found in, when they came from the
    /// controller (a backend that mirrors guest memory compares it with its mirror's).
    pub fn snapshot(&self) -> Option<&'a Arc<MemoryMap>> {
        self.keep
    }

    /// Each segment as (host address, length): numbers for address arithmetic (e.g. a
    /// lookup in a device's DMA mirror), not to be dereferenced.
    pub fn segments(&self) -> impl ExactSizeIterator<Item = (usize, usize)> + 'a {
        self.iov.iter().map(|v| (v.iov_base as usize, v.iov_len))
    }

    /// The raw iovecs, for a syscall (`preadv`, io_uring) or a device's DMA set-up.
    ///
    /// # Safety
    /// The memory may only be accessed by the kernel or a device, or through raw pointers
    /// with the same care as guest memory (no Rust references: the guest may change it
    /// concurrently), and only until the request is reported complete (see the type's
    /// documentation). An asynchronous submission must keep the iovec array itself alive
    /// until then too (the controller's command slot does, for requests it submits).
    pub unsafe fn as_raw_iovecs(&self) -> &'a [libc::iovec] {
        self.iov
    }

    /// Copy `data` into the buffers from their start; returns bytes copied.
    pub fn copy_from_slice(&self, data: &[u8]) -> usize {
        self.write_at(0, data)
    }

    /// Copy the buffers from their start into `out`; returns bytes copied.
    pub fn copy_to_slice(&self, out: &mut [u8]) -> usize {
        self.read_at(0, out)
    }

    /// Copy `data` into the buffers at byte `offset`; returns bytes copied (fewer than
    /// `data.len()` when the buffers end first).
    pub fn write_at(&self, offset: usize, data: &[u8]) -> usize {
        let mut done = 0;
        self.walk(offset, data.len(), |base, n| {
            // SAFETY: `walk` stays inside one segment, which the constructor's contract
            // makes valid writable memory while the request runs; the source is a plain
            // slice of ours and cannot overlap guest memory; no reference to guest memory
            // is formed.
            unsafe { std::ptr::copy_nonoverlapping(data[done..].as_ptr(), base, n) };
            done += n;
        });
        done
    }

    /// Copy the buffers from byte `offset` into `out`; returns bytes copied (fewer than
    /// `out.len()` when the buffers end first).
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> usize {
        let mut done = 0;
        self.walk(offset, out.len(), |base, n| {
            // SAFETY: as in `write_at`, for reading.
            unsafe { std::ptr::copy_nonoverlapping(base, out[done..].as_mut_ptr(), n) };
            done += n;
        });
        done
    }

    /// Call `f(address, n)` for the pieces of `[offset, offset + len)` that lie in the
    /// buffers, in order.
    fn walk(&self, mut offset: usize, mut len: usize, mut f: impl FnMut(*mut u8, usize)) {
        for v in self.iov {
            if len == 0 {
                break;
            }
            if offset >= v.iov_len {
                offset -= v.iov_len;
                continue;
            }
            let n = (v.iov_len - offset).min(len);
            f(v.iov_base.cast::<u8>().wrapping_add(offset), n);
            len -= n;
            offset = 0;
        }
    }
}

/// A copy of a [`GuestBuffers`]' segment list a backend keeps while the request is in
/// flight (to finish it later, or submit it elsewhere). Built only from a `GuestBuffers`, so
/// it describes nothing its source did not; the same lifetime rule applies: not used after
/// the request is reported complete. Reusable without allocating once it has grown.
#[derive(Clone, Default)]
pub struct GuestBufferList {
    iov: Vec<libc::iovec>,
    len: u64,
    keep: Option<Arc<MemoryMap>>,
}

// SAFETY: the iovecs describe guest memory kept mapped by the list's own snapshot (`keep`,
// when taken from controller buffers) or by the contract of `from_raw_iovecs`; the list only
// reaches it through `GuestBuffers`' copies (or its unsafe accessor), whichever thread holds
// it.
unsafe impl Send for GuestBufferList {}

impl std::fmt::Debug for GuestBufferList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_buffers().fmt(f)
    }
}

impl GuestBufferList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// A list of `b`'s segments.
    pub fn of(b: GuestBuffers<'_>) -> Self {
        let mut l = Self::new();
        l.set(b);
        l
    }

    /// Replace the contents with `b`'s segments (no allocation once the list has room).
    pub fn set(&mut self, b: GuestBuffers<'_>) {
        self.iov.clear();
        self.iov.extend_from_slice(b.iov);
        self.len = b.len;
        self.keep = b.keep.cloned();
    }

    /// Forget the segments.
    pub fn clear(&mut self) {
        self.iov.clear();
        self.len = 0;
        self.keep = None;
    }

    /// Replace the contents with bytes `[offset, offset + len)` of `b` (clipped to `b`):
    /// a request split in parts (a RAID strip) describes each part zero-copy, over the same
    /// memory and keeping the same snapshot. No allocation once the list has room.
    pub fn set_range(&mut self, b: GuestBuffers<'_>, offset: u64, len: u64) {
        self.iov.clear();
        self.len = 0;
        self.keep = b.keep.cloned();
        b.walk(offset as usize, len as usize, |base, n| {
            self.iov.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: n,
            });
            self.len += n as u64;
        });
    }

    /// Segments it has room for without allocating.
    pub fn capacity(&self) -> usize {
        self.iov.capacity()
    }

    /// The segments as buffers again.
    pub fn as_buffers(&self) -> GuestBuffers<'_> {
        GuestBuffers {
            iov: &self.iov,
            len: self.len,
            keep: self.keep.as_ref(),
        }
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when no bytes are described.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A buffer of the daemon's own that requests carry like guest buffers (a RAID superblock
/// or bitmap block, a rebuild copy): 4 KiB aligned (fit for `O_DIRECT`), zeroed at first,
/// its bytes reached only by copies ([`write_at`](Self::write_at),
/// [`read_at`](Self::read_at)), never by Rust references, since a backend may be writing
/// it. Lists taken from [`buffers`](Self::buffers) do not keep it alive, as with
/// [`IoVecs::buffers`]: its owner keeps it until the requests that use it are complete.
pub struct IoBuffer {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// The one iovec describing the buffer (its own allocation: a backend may keep a
    /// pointer to it while the request is in flight).
    iov: Box<[libc::iovec; 1]>,
}

// SAFETY: the buffer is plain heap memory owned by this value; it is reached only through
// raw copies by whoever holds the value (or a backend it lent the buffers to), never
// through references bound to a thread.
unsafe impl Send for IoBuffer {}

impl std::fmt::Debug for IoBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuffer").field("len", &self.len).finish()
    }
}

impl IoBuffer {
    const ALIGN: usize = 4096;

    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(1), Self::ALIGN).expect("buffer layout")
    }

    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(Self::layout(len)) };
        let ptr = std::ptr::NonNull::new(raw)
            .unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout(len)));
        let iov = Box::new([libc::iovec {
            iov_base: ptr.as_ptr().cast(),
            iov_len: len,
        }]);
        Self { ptr, len, iov }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a buffer of no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole buffer as request buffers.
    pub fn buffers(&self) -> GuestBuffers<'_> {
        GuestBuffers {
            iov: &self.iov[..],
            len: self.len as u64,
            keep: None,
        }
    }

    /// Copy `data` in at `offset`; returns bytes copied.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> usize {
        self.buffers().write_at(offset, data)
    }

    /// Copy out from `offset` into `out`; returns bytes copied.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> usize {
        self.buffers().read_at(offset, out)
    }
}

impl Drop for IoBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) };
    }
}

/// Build `out` for `len` bytes from the command's data pointer. `write` is true when the
/// controller writes guest memory (a Read command); `page_size` is CC.MPS in bytes.
#[inline]
pub fn map_data(
    mem: &MemoryMap,
    sqe: &Submission,
    len: u64,
    page_size: u64,
    write: bool,
    allow_sgl: bool,
    out: &mut IoVecs,
) -> Result<(), Status> {
    let prp1 = sqe.prp1.get();
    if sqe.psdt() == 0
        && len > 0
        && prp1.trailing_zeros() >= 2
        && page_size - (prp1 & (page_size - 1)) >= len
    {
        // all in PRP1's page (a 4 KiB I/O to an aligned buffer): one lookup, one segment
        out.clear();
        return out.set_guest_one(mem, prp1, len, write);
    }
    map_data_walk(mem, sqe, len, page_size, write, allow_sgl, out)
}

/// [`map_data`] past its one-page case: a PRP pair or list, or an SGL.
#[inline(never)]
fn map_data_walk(
    mem: &MemoryMap,
    sqe: &Submission,
    len: u64,
    page_size: u64,
    write: bool,
    allow_sgl: bool,
    out: &mut IoVecs,
) -> Result<(), Status> {
    if len == 0 {
        out.clear();
        return Ok(());
    }
    // both walks start by clearing `out`
    match sqe.psdt() {
        0 => map_prps(
            mem,
            sqe.prp1.get(),
            sqe.prp2.get(),
            len,
            page_size,
            write,
            out,
        ),
        1 | 2 if allow_sgl => {
            let mut first = SglDescriptor::default();
            first.addr = sqe.prp1;
            let raw = sqe.prp2.get();
            first.len = (raw as u32).into();
            first.rsvd = [(raw >> 32) as u8, (raw >> 40) as u8, (raw >> 48) as u8];
            first.id = (raw >> 56) as u8;
            map_sgl(mem, &first, len, write, out)
        }
        _ => Err(Status::INVALID_FIELD),
    }
}

/// Walk a PRP pair / PRP list (§4.3.1).
pub fn map_prps(
    mem: &MemoryMap,
    prp1: u64,
    prp2: u64,
    len: u64,
    page_size: u64,
    write: bool,
    out: &mut IoVecs,
) -> Result<(), Status> {
    out.clear();
    if prp1 & 3 != 0 {
        return Err(Status::PRP_OFFSET_INVALID);
    }
    let first = (page_size - (prp1 & (page_size - 1))).min(len);
    if first == len && len > 0 {
        // all in PRP1's page (a 4 KiB I/O to an aligned buffer): one lookup, one segment
        return out.set_guest_one(mem, prp1, len, write);
    }
    out.push_guest(mem, prp1, first, write)?;
    let mut remaining = len - first;
    if remaining == 0 {
        return Ok(());
    }
    if remaining <= page_size {
        if prp2 & (page_size - 1) != 0 {
            return Err(Status::PRP_OFFSET_INVALID);
        }
        return out.push_guest(mem, prp2, remaining, write);
    }
    // PRP2 points to a PRP list; the last entry of a full list page chains to the next page.
    if prp2 & 7 != 0 {
        return Err(Status::PRP_OFFSET_INVALID);
    }
    let mut list = prp2;
    let max_pages = len.div_ceil(page_size) + 1;
    let mut visited = 0;
    while remaining > 0 {
        let entries_in_page = (page_size - (list & (page_size - 1))) / 8;
        for i in 0..entries_in_page {
            let mut e = [0u8; 8];
            mem.read(list + i * 8, &mut e)
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
            let entry = u64::from_le_bytes(e);
            visited += 1;
            if visited > max_pages {
                return Err(Status::INVALID_FIELD);
            }
            if i == entries_in_page - 1 && remaining > page_size {
                // chain pointer to the next list page
                if entry & 7 != 0 {
                    return Err(Status::PRP_OFFSET_INVALID);
                }
                list = entry;
                break;
            }
            if entry & (page_size - 1) != 0 {
                return Err(Status::PRP_OFFSET_INVALID);
            }
            let n = remaining.min(page_size);
            out.push_guest(mem, entry, n, write)?;
            remaining -= n;
            if remaining == 0 {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Walk an SGL (§4.3.2): data blocks, segments and a last segment. Bit buckets are refused.
pub fn map_sgl(
    mem: &MemoryMap,
    first: &SglDescriptor,
    len: u64,
    write: bool,
    out: &mut IoVecs,
) -> Result<(), Status> {
    out.clear();
    let mut remaining = len;
    let mut desc = *first;
    // A bound on descriptors read, so a looping segment chain cannot spin forever.
    let mut budget = 4 * crate::dptr::MAX_IOV;
    loop {
        let ty = desc.id >> 4;
        let subtype = desc.id & 0xf;
        if subtype != 0 {
            return Err(Status::INVALID_SGL_TYPE);
        }
        match ty {
            sgl_type::DATA_BLOCK => {
                let n = u64::from(desc.len.get()).min(remaining);
                out.push_guest(mem, desc.addr.get(), n, write)?;
                remaining -= n;
                return if remaining == 0 {
                    Ok(())
                } else {
                    Err(Status::DATA_SGL_LENGTH_INVALID)
                };
            }
            sgl_type::SEGMENT | sgl_type::LAST_SEGMENT => {
                let seg_len = u64::from(desc.len.get());
                if seg_len == 0 || seg_len % 16 != 0 {
                    return Err(Status::INVALID_SGL_SEGMENT);
                }
                let count = seg_len / 16;
                let base = desc.addr.get();
                let last_seg = ty == sgl_type::LAST_SEGMENT;
                let mut next = None;
                for i in 0..count {
                    budget = budget.checked_sub(1).ok_or(Status::INVALID_SGL_COUNT)?;
                    let mut raw = [0u8; 16];
                    mem.read(base + i * 16, &mut raw)
                        .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
                    let d =
                        SglDescriptor::read_from_bytes(&raw).map_err(|_| Status::INTERNAL_ERROR)?;
                    let dty = d.id >> 4;
                    if d.id & 0xf != 0 {
                        return Err(Status::INVALID_SGL_TYPE);
                    }
                    match dty {
                        sgl_type::DATA_BLOCK => {
                            if remaining == 0 {
                                continue;
                            }
                            let n = u64::from(d.len.get()).min(remaining);
                            out.push_guest(mem, d.addr.get(), n, write)?;
                            remaining -= n;
                        }
                        sgl_type::SEGMENT | sgl_type::LAST_SEGMENT
                            if !last_seg && i == count - 1 =>
                        {
                            next = Some(d);
                        }
                        sgl_type::SEGMENT | sgl_type::LAST_SEGMENT => {
                            return Err(Status::INVALID_SGL_SEGMENT);
                        }
                        _ => return Err(Status::INVALID_SGL_TYPE),
                    }
                }
                match next {
                    Some(d) => desc = d,
                    None if remaining == 0 => return Ok(()),
                    None => return Err(Status::DATA_SGL_LENGTH_INVALID),
                }
            }
            _ => return Err(Status::INVALID_SGL_TYPE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestMemory, Protection, tests::memfd};
    use std::os::fd::AsFd;

    fn mem() -> (GuestMemory, std::os::fd::OwnedFd) {
        let m = GuestMemory::new();
        let fd = memfd(0x100000);
        m.map_fd(
            0,
            0x100000,
            fd.as_fd(),
            0,
            Protection {
                read: true,
                write: true,
            },
        )
        .unwrap();
        (m, fd)
    }

    #[test]
    fn prp_single_pair_and_list() {
        let (m, _fd) = mem();
        let s = m.snapshot();
        let mut v = IoVecs::default();
        map_prps(&s, 0x1100, 0, 0x100, 4096, true, &mut v).unwrap();
        assert_eq!((v.as_slice().len(), v.len()), (1, 0x100));
        map_prps(&s, 0x1800, 0x5000, 0x1000, 4096, true, &mut v).unwrap();
        assert_eq!((v.as_slice().len(), v.len()), (2, 0x1000));
        // list at 0x9000 with pages 0x2000, 0x3000, 0x7000 (0x2000+0x3000 merge)
        for (i, p) in [0x2000u64, 0x3000, 0x7000].iter().enumerate() {
            s.write(0x9000 + 8 * i as u64, &p.to_le_bytes()).unwrap();
        }
        map_prps(&s, 0x1000, 0x9000, 0x4000, 4096, false, &mut v).unwrap();
        assert_eq!((v.as_slice().len(), v.len()), (2, 0x4000));
    }

    /// Without storage there is room for one segment: a command of one page maps without
    /// a block; one of two segments asks for storage, and maps in full once it has it.
    #[test]
    fn one_segment_needs_no_storage_and_more_ask_for_it() {
        let (m, _fd) = mem();
        let s = m.snapshot();
        let mut v = IoVecs::empty();
        map_prps(&s, 0x1000, 0, 0x1000, 4096, true, &mut v).unwrap();
        assert_eq!(
            (v.as_slice().len(), v.len(), v.needs_storage()),
            (1, 0x1000, false)
        );
        // 0x1800.. and 0x5000.. are not contiguous: a second segment
        assert!(map_prps(&s, 0x1800, 0x5000, 0x1000, 4096, true, &mut v).is_err());
        assert!(v.needs_storage());
        v.give_storage(iovec_block());
        assert!(!v.needs_storage(), "lending storage starts afresh");
        map_prps(&s, 0x1800, 0x5000, 0x1000, 4096, true, &mut v).unwrap();
        assert_eq!((v.as_slice().len(), v.len()), (2, 0x1000));
        // storage taken back: one segment again, in the slot's own room
        assert!(v.take_storage().is_some());
        map_prps(&s, 0x2000, 0, 0x800, 4096, false, &mut v).unwrap();
        assert_eq!(v.as_slice().len(), 1);
        assert_eq!(v.as_slice()[0].iov_len, 0x800);
    }

    #[test]
    fn a_kept_buffer_list_keeps_its_memory_mapped_after_the_client_unmaps_it() {
        let (m, _fd) = mem();
        let s = m.snapshot();
        let mut v = IoVecs::default();
        map_prps(&s, 0x1000, 0, 0x1000, 4096, true, &mut v).unwrap();
        let list = GuestBufferList::of(v.buffers_in(&s));
        drop(s);
        m.clear(); // the client takes its memory away while a backend holds the request
        // the list's snapshot still maps it: a late backend write lands, nothing faults
        assert_eq!(list.as_buffers().write_at(16, &[7u8; 32]), 32);
        let mut back = [0u8; 32];
        assert_eq!(list.as_buffers().read_at(16, &mut back), 32);
        assert_eq!(back, [7u8; 32]);
        assert!(
            m.snapshot().read(0x1010, &mut back).is_err(),
            "gone from the map"
        );
    }

    #[test]
    fn a_range_of_buffers_describes_exactly_those_bytes() {
        let b = IoBuffer::new(8192);
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 13 + 1) as u8).collect();
        b.write_at(0, &data);
        let two = GuestBufferList::of(b.buffers());
        // ranges of a range: the second half, then a piece of it
        let mut second = GuestBufferList::new();
        second.set_range(two.as_buffers(), 4096, 4096);
        let mut piece = GuestBufferList::new();
        piece.set_range(second.as_buffers(), 10, 20);
        let mut out = [0u8; 20];
        piece.as_buffers().read_at(0, &mut out);
        assert_eq!(&out[..], &data[4106..4126]);
        let mut r = GuestBufferList::new();
        for (off, len) in [
            (0u64, 1u64),
            (100, 5000),
            (4095, 2),
            (8000, 500),
            (9000, 10),
        ] {
            r.set_range(b.buffers(), off, len);
            let start = (off as usize).min(data.len());
            let want = (data.len() - start).min(len as usize);
            assert_eq!(r.len(), want as u64);
            let mut out = vec![0u8; want];
            assert_eq!(r.as_buffers().read_at(0, &mut out), want);
            assert_eq!(&out[..], &data[start..start + want]);
        }
        assert_eq!(second.len(), 4096);
    }

    #[test]
    fn a_page_across_two_regions_or_without_the_access_right() {
        let m = GuestMemory::new();
        let (first, second) = (memfd(0x1000), memfd(0x1000));
        let rw = Protection {
            read: true,
            write: true,
        };
        let ro = Protection {
            read: true,
            write: false,
        };
        m.map_fd(0x10000, 0x800, first.as_fd(), 0, rw).unwrap();
        m.map_fd(0x10800, 0x1000, second.as_fd(), 0, ro).unwrap();
        let s = m.snapshot();
        let mut v = IoVecs::default();
        // inside PRP1's page but over two regions: two segments
        map_prps(&s, 0x10400, 0, 0x800, 4096, false, &mut v).unwrap();
        assert_eq!((v.as_slice().len(), v.len()), (2, 0x800));
        // the controller writes (a Read command): the second region is read-only
        assert_eq!(
            map_prps(&s, 0x10400, 0, 0x800, 4096, true, &mut v),
            Err(Status::DATA_TRANSFER_ERROR)
        );
        assert_eq!(
            map_prps(&s, 0x10800, 0, 0x200, 4096, true, &mut v),
            Err(Status::DATA_TRANSFER_ERROR)
        );
        map_prps(&s, 0x10000, 0, 0x200, 4096, true, &mut v).unwrap();
        assert_eq!((v.as_slice().len(), v.len()), (1, 0x200));
    }

    #[test]
    fn prp_outside_memory_or_misaligned_is_an_error() {
        let (m, _fd) = mem();
        let s = m.snapshot();
        let mut v = IoVecs::default();
        assert_eq!(
            map_prps(&s, 0x200000, 0, 512, 4096, true, &mut v),
            Err(Status::DATA_TRANSFER_ERROR)
        );
        assert_eq!(
            map_prps(&s, 0x1001, 0, 512, 4096, true, &mut v),
            Err(Status::PRP_OFFSET_INVALID)
        );
        assert_eq!(
            map_prps(&s, 0x1000, 0x2100, 0x2000, 4096, true, &mut v),
            Err(Status::PRP_OFFSET_INVALID)
        );
        s.write(0x9000, &0x300000u64.to_le_bytes()).unwrap();
        assert_eq!(
            map_prps(&s, 0x1000, 0x9000, 0x3000, 4096, true, &mut v),
            Err(Status::DATA_TRANSFER_ERROR)
        );
    }

    #[test]
    fn prp_list_chain_loop_terminates() {
        let (m, _fd) = mem();
        let s = m.snapshot();
        // a list page whose last entry points back to itself
        for i in 0..511u64 {
            s.write(0x9000 + 8 * i, &0x2000u64.to_le_bytes()).unwrap();
        }
        s.write(0x9000 + 8 * 511, &0x9000u64.to_le_bytes()).unwrap();
        let mut v = IoVecs::default();
        let r = map_prps(&s, 0x1000, 0x9000, 4096 * 2000, 4096, true, &mut v);
        assert!(r.is_err());
    }

    #[test]
    fn sgl_last_segment_and_errors() {
        let (m, _fd) = mem();
        let s = m.snapshot();
        let mk = |addr: u64, len: u32, ty: u8| {
            let mut d = SglDescriptor::default();
            d.addr = addr.into();
            d.len = len.into();
            d.id = ty << 4;
            d
        };
        use zerocopy::IntoBytes;
        s.write(0x8000, mk(0x1000, 0x800, sgl_type::DATA_BLOCK).as_bytes())
            .unwrap();
        s.write(0x8010, mk(0x3000, 0x800, sgl_type::DATA_BLOCK).as_bytes())
            .unwrap();
        let mut v = IoVecs::default();
        map_sgl(
            &s,
            &mk(0x8000, 32, sgl_type::LAST_SEGMENT),
            0x1000,
            true,
            &mut v,
        )
        .unwrap();
        assert_eq!((v.as_slice().len(), v.len()), (2, 0x1000));
        assert_eq!(
            map_sgl(
                &s,
                &mk(0x8000, 32, sgl_type::LAST_SEGMENT),
                0x2000,
                true,
                &mut v
            ),
            Err(Status::DATA_SGL_LENGTH_INVALID)
        );
        assert_eq!(
            map_sgl(
                &s,
                &mk(0x8000, 17, sgl_type::LAST_SEGMENT),
                0x1000,
                true,
                &mut v
            ),
            Err(Status::INVALID_SGL_SEGMENT)
        );
        assert_eq!(
            map_sgl(&s, &mk(0x1000, 0x1000, 0x5), 0x1000, true, &mut v),
            Err(Status::INVALID_SGL_TYPE)
        );
        // a segment that chains to itself
        s.write(0x8020, mk(0x8020, 16, sgl_type::SEGMENT).as_bytes())
            .unwrap();
        assert!(map_sgl(&s, &mk(0x8020, 16, sgl_type::SEGMENT), 0x1000, true, &mut v).is_err());
    }
}
