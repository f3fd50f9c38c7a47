//! Interrupt delivery: one eventfd per MSI-X vector (the client's irqfd, so KVM injects
//! without an exit), or the INTx eventfd when MSI-X is not set up.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// Why a client's interrupt fd was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IrqFdError {
    #[error("interrupt fd is {0}, not an eventfd")]
    NotAnEventfd(String),
    #[error("cannot make the interrupt eventfd non-blocking: errno {0}")]
    NonBlocking(i32),
}

/// Accept `fd` as an interrupt fd only if it is an eventfd (a pipe or socket could fill up
/// and block the reactor that signals it), and make it non-blocking: a signal that would
/// block (counter at its maximum, i.e. the interrupt is pending anyway) is dropped.
pub fn check_eventfd(fd: BorrowedFd<'_>) -> Result<(), IrqFdError> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_or_else(
        |e| format!("unknown ({e})"),
        |p| p.to_string_lossy().into_owned(),
    );
    if link != "anon_inode:[eventfd]" {
        return Err(IrqFdError::NotAnEventfd(link));
    }
    sys_util::fd::set_nonblocking(fd)
        .map_err(|e| IrqFdError::NonBlocking(e.raw_os_error().unwrap_or(0)))?;
    Ok(())
}

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
        // non-blocking (check_eventfd): EAGAIN means the interrupt is already pending
        let _ = sys_util::fd::signal_eventfd(fd.as_fd());
    }
}
