//! SIGBUS containment for memory a client shares with us and can shrink behind our back.
//!
//! A DMA_MAP fd is a file the client still holds: if it `ftruncate`s the file below a range
//! we mapped, our next load or store there raises SIGBUS (BUS_ADRERR), which by default kills
//! the whole daemon, every tenant with it. QEMU's memfd backend seals its RAM against
//! shrinking (`seal=on`, the default), but hugetlbfs and tmpfs files, and clients written
//! apart from QEMU, are not sealed. So every guest mapping is registered here, and a
//! process-wide SIGBUS handler that finds the faulting address inside a registered range
//! replaces the lost page with a private zero page (`MAP_FIXED` anonymous) and returns: the
//! access is retried and succeeds, the data is the client's own lost memory, and the fault is
//! counted ([`faults`]) for the control plane to log. A SIGBUS anywhere else is a real bug:
//! the default action is restored and the process dies as it would have.
//!
//! Kernel-side accesses (io_uring, `preadv`) to a truncated range fail with EFAULT instead,
//! which the backend reports as a failed command; device DMA uses pages pinned at map time.

use std::sync::Once;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Guest mappings one process can register at once (128 tenants x 1024 regions, twice).
const SLOTS: usize = 1 << 18;

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to build the static array
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
};

static RANGES: [Slot; SLOTS] = [EMPTY; SLOTS];
/// One past the highest slot ever used (the handler scans only that far).
static HIGH: AtomicUsize = AtomicUsize::new(0);
static FAULTS: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

/// Pages of guest memory that vanished under us (client truncated its file) since start.
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Relaxed)
}

/// A registered range; unregistered on drop (before the owner unmaps it).
#[derive(Debug)]
pub(crate) struct Guard {
    slot: usize,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let s = &RANGES[self.slot];
        s.end.store(0, Ordering::Release);
        s.start.store(0, Ordering::Release);
    }
}

/// Register `[start, start + len)` (a live mapping of ours) as guest memory whose loss is
/// contained. None when every slot is taken (the caller refuses the mapping).
pub(crate) fn register(start: usize, len: usize) -> Option<Guard> {
    INSTALL.call_once(install);
    let end = start.checked_add(len)?;
    if start == 0 || len == 0 {
        return None;
    }
    for (i, s) in RANGES.iter().enumerate() {
        if s.start
            .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            s.end.store(end, Ordering::Release);
            HIGH.fetch_max(i + 1, Ordering::AcqRel);
            return Some(Guard { slot: i });
        }
    }
    None
}

/// The registered range holding `addr`, if any.
fn covering(addr: usize) -> Option<(usize, usize)> {
    let high = HIGH.load(Ordering::Acquire);
    RANGES[..high].iter().find_map(|s| {
        let (a, b) = (
            s.start.load(Ordering::Acquire),
            s.end.load(Ordering::Acquire),
        );
        (a != 0 && a <= addr && addr < b).then_some((a, b))
    })
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    if let Some((start, end)) = covering(addr) {
        // the faulting thread holds the mapping alive (it is reading through it), so the
        // range cannot be unmapped and reused under us; try base pages, then huge pages
        for page in [4096usize, 2 << 20, 1 << 30] {
            let base = addr & !(page - 1);
            if base < start || base + page > end {
                continue;
            }
            // SAFETY: replaces one page of a guest mapping of ours (registered and alive) with
            // private zero memory; mmap is async-signal-safe.
            let p = unsafe {
                libc::mmap(
                    base as *mut libc::c_void,
                    page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                FAULTS.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
    // not guest memory: the default action on return (the access faults again and kills us)
    // SAFETY: resetting SIGBUS to its default disposition; signal() is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

fn install() {
    // SAFETY: a zeroed sigaction is valid; we set the handler, SA_SIGINFO and an empty mask,
    // and install it for SIGBUS only.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigbus;
        sa.sa_sigaction = handler as libc::sighandler_t;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        libc::sigemptyset(&raw mut sa.sa_mask);
        if libc::sigaction(libc::SIGBUS, &raw const sa, std::ptr::null_mut()) != 0 {
            log::error!(
                "cannot install the SIGBUS handler: {}; a client that truncates its memory \
                 can crash the daemon",
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::tests::memfd;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_truncated_mapping_reads_zeroes_instead_of_killing_the_process() {
        let fd = memfd(0x4000);
        // SAFETY: a shared mapping of our own memfd; checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                0x4000,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let p = p.cast::<u8>();
        let guard = register(p as usize, 0x4000).unwrap();
        // SAFETY: p is a live 16 KiB mapping.
        unsafe { p.add(0x3000).write_volatile(7) };
        // SAFETY: shrinking our own memfd (what a hostile client does).
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 0x1000) }, 0);
        let before = faults();
        // SAFETY: the page is gone from the file; the handler maps a zero page over it.
        let v = unsafe { p.add(0x3000).read_volatile() };
        assert_eq!(v, 0);
        // SAFETY: as above, for a store to another lost page.
        unsafe { p.add(0x2000).write_volatile(1) };
        assert!(faults() >= before + 2);
        drop(guard);
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(p.cast(), 0x4000) };
    }
}
