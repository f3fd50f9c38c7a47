//! Commands that need more than one backend request, or work on the data once it arrives:
//! Format NVM (NVMe base 2.0 §5.23) and Flush of every namespace (NSID FFFFFFFFh, base 2.0
//! §7.1) send one request to each namespace's backend at once; Dataset Management (NVM
//! command set 1.0 §3.2.3) deallocates its ranges one after the other. Such a command
//! completes when its last request did, with the first error. Compare (NVM command set 1.0
//! §3.2.1) reads into a buffer of the daemon's and compares when the read completes; Verify
//! (§3.2.5) reads into one and reports how the read went. All of
//! it goes through the backends' `submit` and `poll` like a read or a write: nothing waits
//! on the reactor.
//!
//! This file is the bookkeeping; `compound_io.rs` issues and completes the requests. The
//! bookkeeping lives in the command's slot, so a reset that retires the slot keeps it
//! (with the buffer a Compare reads into) until the backend answers, and every request
//! carries the reset epoch in its tag ([`crate::quiesce`]): a late answer is dropped. The
//! memory it takes is bounded per controller: at most [`MAX_COMPARES`] Compares and
//! [`MAX_PART_LISTS`] commands with parts are in flight; more wait, fetched but not started,
//! until one finishes.

use std::collections::VecDeque;

use nvme_spec::{Status, Submission};

use crate::backend::IoOp;

/// Compares and Verifies a controller has in flight at most: each holds a buffer of up to
/// twice the maximum transfer size (the host's data and the media's; a Verify only the
/// media's).
pub const MAX_COMPARES: usize = 2;
/// Commands with parts a controller has in flight at most: each holds a list of up to 256
/// parts (Dataset Management ranges, or namespaces) of 32 bytes.
pub const MAX_PART_LISTS: usize = 64;

/// One backend request of a compound command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub nsid: u32,
    pub op: IoOp,
    pub offset: u64,
    /// For a piece of a read or write: (byte offset in the command's data, length).
    pub data: Option<(u64, u64)>,
}

/// The state of a command in flight that needs more than a backend request.
#[derive(Debug)]
pub enum Compound {
    /// Several backend requests.
    Parts(Parts),
    /// A Compare: the host's data, then the blocks read from the backend.
    Compare(Vec<u8>),
    /// A Verify: the blocks read from the backend.
    Verify(Vec<u8>),
}

impl Compound {
    pub(crate) fn parts(&mut self) -> Option<&mut Parts> {
        match self {
            Compound::Parts(p) => Some(p),
            Compound::Compare(_) | Compound::Verify(_) => None,
        }
    }

    /// Where the backend reads the blocks of a Compare or a Verify.
    pub(crate) fn media(&mut self) -> Option<&mut [u8]> {
        match self {
            Compound::Compare(buf) => {
                let half = buf.len() / 2;
                Some(&mut buf[half..])
            }
            Compound::Verify(buf) => Some(buf),
            Compound::Parts(_) => None,
        }
    }
}

/// The backend requests of a compound command in flight.
#[derive(Debug)]
pub struct Parts {
    pub(crate) list: Vec<Part>,
    /// Index of the next part to submit.
    pub(crate) next: usize,
    pub(crate) in_flight: usize,
    /// Parts in flight at most.
    pub(crate) window: usize,
    /// The first error (parts not yet submitted are then dropped).
    pub(crate) status: Status,
}

impl Parts {
    /// True once no part is in flight and none is left to submit.
    pub(crate) fn finished(&self) -> bool {
        self.in_flight == 0 && (self.next == self.list.len() || !self.status.is_success())
    }
}

/// Commands fetched while their kind had no room ([`MAX_COMPARES`], [`MAX_PART_LISTS`]):
/// (SQ id, slot, command), dispatched again as others finish. At most one per command in
/// flight, so bounded by [`crate::controller::MAX_COMMANDS_IN_FLIGHT`].
pub(crate) type Waiting = VecDeque<(u16, u16, Submission)>;
