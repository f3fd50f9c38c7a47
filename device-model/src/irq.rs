//! Interrupt delivery: one eventfd per MSI-X vector (the client's irqfd, so KVM injects
//! without an exit), or the INTx eventfd when MSI-X is not set up.

use std::os::fd::{AsRawFd, OwnedFd};

/// Eventfds the client gave us through SET_IRQS.
#[derive(Debug, Default)]
pub struct Interrupts {
    msix: Vec<Option<OwnedFd>>,
    intx: Option<OwnedFd>,
}

impl Interrupts {
    /// Replace MSI-X vectors `start..start+fds.len()` (None = disable that vector).
    pub fn set_msix(&mut self, start: usize, fds: Vec<Option<OwnedFd>>) {
        let end = start + fds.len();
        if self.msix.len() < end {
            self.msix.resize_with(end, || None);
        }
        for (i, fd) in fds.into_iter().enumerate() {
            self.msix[start + i] = fd;
        }
    }

    /// Set or clear the INTx eventfd.
    pub fn set_intx(&mut self, fd: Option<OwnedFd>) {
        self.intx = fd;
    }

    /// Drop every eventfd (client gone, device reset).
    pub fn clear(&mut self) {
        self.msix.clear();
        self.intx = None;
    }

    /// Signal `vector`: its MSI-X eventfd, else INTx if no MSI-X vector is configured at all.
    pub fn signal(&self, vector: u16) {
        let fd = match self.msix.get(vector as usize) {
            Some(Some(fd)) => fd,
            _ if self.msix.iter().all(Option::is_none) => match &self.intx {
                Some(fd) => fd,
                None => return,
            },
            _ => return,
        };
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a local u64 to an eventfd we own.
        unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) };
    }
}
